"""mlx_vlm.server.stop_at_exit: the server's generation thread ends, on itself, before the process does.

mlx-vlm's server runs generation on one daemon thread (`ResponseGenerator`), which
clears its MLX streams when it ends, but the server stops it only when a model is
unloaded, never at shutdown. At exit the thread is still alive and owns streams, so
their C++ threads are still joinable when static destructors run, and the process
aborts with `terminate called without an active exception` (exit -6 after SIGINT, with
or without the other patches: measured on mlx-vlm 0.7.10, mlx 0.32.4 CPU).

How: see `patches.common.server_stop_at_exit`: an atexit handler calls each
generator's own ``stop_and_join(timeout=...)``.
"""

from ..common.server_stop_at_exit import ServerStopAtExitPatch

# A thread alive at exit aborts the process whether or not streams are thread-bound.
PATCH = ServerStopAtExitPatch(id="mlx_vlm.server.stop_at_exit", package="mlx-vlm",
                              trigger="mlx_vlm.server.generation", server_module="mlx_vlm.server.generation")
