"""A typical threaded service: one model, requests answered on a thread pool."""

from concurrent.futures import ThreadPoolExecutor

from mlx_lm import generate, load


class ChatService:
    def __init__(self, model_path: str, threads: int = 4) -> None:
        self.model, self.tokenizer = load(model_path)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="chat")

    def answer(self, prompt: str, max_tokens: int = 8) -> str:
        return generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens)

    def answer_all(self, prompts):
        return list(self.pool.map(self.answer, prompts))

    def close(self) -> None:
        self.pool.shutdown()
