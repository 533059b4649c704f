"""mlx_lm.server.stop_at_exit: the server's generation thread is stopped, and waited for, at exit (0.28.4+).

A KeyboardInterrupt while a rank > 0 of a distributed server waits in
``response_generator.join()`` (Python < 3.13) leaves that thread running as the
interpreter finalizes, which aborts the process.
"""

from ..common.server_stop_at_exit import ServerStopAtExitPatch

# A thread alive at exit aborts the process whether or not streams are thread-bound.
# Triggered by mlx_lm itself: `python -m mlx_lm.server` never imports mlx_lm.server by name.
PATCH = ServerStopAtExitPatch(id="mlx_lm.server.stop_at_exit", package="mlx-lm", trigger="mlx_lm",
                              server_module="mlx_lm.server")
