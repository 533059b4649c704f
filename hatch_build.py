"""The wheel's build hook: it carries compat.toml pre-parsed as mlx_threadsafe/compat.json.

install() reads the JSON where it is there (planning.load_matrix): tomllib and its parse would
cost it about 4 ms. compat.toml stays the one source; the JSON is made from it at each build,
never kept in the repository. The editable wheel gets none: the source tree's compat.toml is read.
"""

import json
import os
import shutil
import tempfile

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class CompatJsonHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version, build_data):
        if version == "editable":
            return
        with open(os.path.join(self.root, "mlx_threadsafe", "compat.toml"), "rb") as toml:
            matrix = tomllib.load(toml)
        self._folder = tempfile.mkdtemp(prefix="mlx-threadsafe-build-")
        path = os.path.join(self._folder, "compat.json")
        with open(path, "w", encoding="utf-8") as out:
            json.dump(matrix, out, indent=0, sort_keys=True)
        build_data["force_include"][path] = "mlx_threadsafe/compat.json"

    def finalize(self, version, build_data, artifact_path):
        if getattr(self, "_folder", None):
            shutil.rmtree(self._folder, ignore_errors=True)
