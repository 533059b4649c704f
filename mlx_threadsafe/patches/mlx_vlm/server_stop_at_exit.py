"""mlx_vlm.server.stop_at_exit: the server's generation thread is stopped, and waited for, at exit.

mlx-vlm's server stops that thread only when a model is unloaded; still alive at exit, it owns
streams while the interpreter finalizes, and the process aborts (``terminate called without an
active exception``).
"""

from ..common.server_stop_at_exit import ServerStopAtExitPatch

# A thread alive at exit aborts the process whether or not streams are thread-bound.
PATCH = ServerStopAtExitPatch(id="mlx_vlm.server.stop_at_exit", package="mlx-vlm",
                              trigger="mlx_vlm.server.generation", server_module="mlx_vlm.server.generation")
