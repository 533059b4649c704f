import asyncio

import pytest
from chat_service import ChatService

PROMPTS = [f"w{i} w{i + 1} w{i + 2}" for i in range(3, 11)]


@pytest.fixture
def service(mlx_tiny_model):
    service = ChatService(mlx_tiny_model("llama").path)
    yield service
    service.close()


def test_pool_answers_match_answers_on_the_calling_thread(service):
    serial = [service.answer(prompt) for prompt in PROMPTS]
    assert service.answer_all(PROMPTS) == serial


@pytest.mark.mlx_cross_thread
def test_service_built_and_used_off_the_main_thread(service):
    assert service.answer_all(PROMPTS[:2]) == [service.answer(p) for p in PROMPTS[:2]]


def test_asyncio_to_thread_handler(service):
    async def handler():
        return await asyncio.gather(*(asyncio.to_thread(service.answer, p) for p in PROMPTS[:4]))

    assert asyncio.run(handler()) == [service.answer(p) for p in PROMPTS[:4]]


def test_model_owned_by_a_worker(mlx_worker, mlx_tiny_model):
    path = mlx_tiny_model("qwen3").path
    service = mlx_worker.call(ChatService, path, 1)  # loaded on the worker's thread
    try:
        assert mlx_worker.call(service.answer, "w1 w2") == service.answer("w1 w2")
    finally:
        service.close()


def test_status_names_the_applied_patches(mlx_threadsafe_status):
    assert mlx_threadsafe_status.installed
    assert mlx_threadsafe_status["mlx.thread_cleanup"].state in ("applied", "pending-import")
