"""Fault injection for the end-to-end fault test. The test puts this folder on the PYTHONPATH of one
model replica (`model_runtime_env: {env_vars: {PYTHONPATH: ...}}`), so Python runs this file when
that replica's worker process starts.

Once the file named by JAXLORA_TEST_FAULT_FILE appears, the engine's next decode step raises, as a
device error would. The file is removed when the fault fires, so the replacement replica runs normally.
Nothing in the project imports this.
"""

import os
from pathlib import Path

if "JAXLORA_TEST_FAULT_FILE" in os.environ:
    from jaxlora.engine import Engine

    _trigger = Path(os.environ["JAXLORA_TEST_FAULT_FILE"])
    _real_generate = Engine.generate

    def _generate(self, lora, state):
        try:
            _trigger.unlink()
        except FileNotFoundError:
            return _real_generate(self, lora, state)
        raise RuntimeError("injected fault: the device step failed")

    Engine.generate = _generate
