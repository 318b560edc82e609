"""setup.cfg holds the metadata; this file only ships `peft_fishertune_autoload.pth` into site-packages.

The .pth line installs `_peft_fishertune_hook` (src/_peft_fishertune_hook.py): FisherTune registers with PEFT when
`peft` is imported, so `PeftModel.from_pretrained` / `AutoPeftModel` load a FisherTune adapter without
`import peft_fishertune`. A .pth file must sit at the top of site-packages, which setup.cfg's data_files cannot
reach: `build_py` puts it at the root of the build (so a wheel, hence `pip install`, has it in purelib), and
`editable_wheel` (pip install -e) adds it to the editable wheel's root.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src", "peft_fishertune_autoload.pth")


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, os.path.basename(PTH)), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, os.path.basename(PTH))]


cmdclass = {"build_py": build_py_with_pth}

try:
    from setuptools.command.editable_wheel import editable_wheel

    class editable_wheel_with_pth(editable_wheel):
        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            out = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            shutil.copy(PTH, os.path.join(unpacked_wheel, os.path.basename(PTH)))
            return out

    cmdclass["editable_wheel"] = editable_wheel_with_pth
except ImportError:  # setuptools < 64: no PEP 660 editable wheels (develop installs via egg-link)
    pass

setup(cmdclass=cmdclass)
