"""Only here to ship the opt-in auto-install hook: a .pth file at the top of site-packages.

Everything else is in pyproject.toml. The .pth line costs one dictionary lookup at
start-up and imports nothing unless MLX_THREADSAFE is set (see mlx_threadsafe/autoinstall.py).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HOOK = "mlx_threadsafe-autoinstall.pth"


class BuildPyWithStartupHook(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join("mlx_threadsafe", "bootstrap", HOOK), os.path.join(self.build_lib, HOOK))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, HOOK)]


class EditableWheelWithStartupHook(editable_wheel):
    # An editable wheel maps packages only; put the hook next to the dist-info so that
    # `pip install -e .` gets it too (the CI and the release venvs install that way).
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        files, mapping = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        self.copy_file(os.path.join("mlx_threadsafe", "bootstrap", HOOK), os.path.join(unpacked_wheel, HOOK))
        return files, mapping


setup(cmdclass={"build_py": BuildPyWithStartupHook, "editable_wheel": EditableWheelWithStartupHook})
