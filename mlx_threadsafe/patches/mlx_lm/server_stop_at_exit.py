"""mlx_lm.server.stop_at_exit: the server's generation thread ends before the process does (0.28.4+).

``mlx_lm.server`` runs generation on the thread of its ``ResponseGenerator``. Rank 0
stops it after a KeyboardInterrupt in ``serve_forever``; every other rank of a
distributed server (``mlx.launch ... -- mlx_lm.server``) waits in
``response_generator.join()``, and a KeyboardInterrupt there (Python < 3.13) leaves
the generation thread running, unwaited, while the interpreter finalizes: rank 1
aborted in 3 of 3 Ctrl-C runs. The thread is stopped and waited for (bounded) at exit.
"""

from ..common.server_stop_at_exit import ServerStopAtExitPatch

# A thread alive at exit aborts the process whether or not streams are thread-bound.
# Triggered by mlx_lm itself: `python -m mlx_lm.server` never imports mlx_lm.server by name.
PATCH = ServerStopAtExitPatch(id="mlx_lm.server.stop_at_exit", package="mlx-lm", trigger="mlx_lm",
                              server_module="mlx_lm.server")
