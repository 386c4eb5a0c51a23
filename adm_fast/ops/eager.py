"""The eager backend: the references themselves, guided-diffusion's arithmetic.

It accepts every input the op-level checks accept, so `auto` always has it to
fall back on, and it is the baseline every other backend is tested against.
"""

from .ddim_step import OP as DDIM_STEP, reference as ddim_step_reference
from .ddpm_step import OP as DDPM_STEP, reference as ddpm_step_reference
from .dispatch import Backend, register_backend
from .group_norm_act import OP as GROUP_NORM_ACT, reference as group_norm_act_reference
from .qkv_attention import OP as QKV_ATTENTION, reference as qkv_attention_reference


class EagerBackend(Backend):
    name = "eager"
    priority = 0

    def notes(self) -> str:
        return "everywhere: guided-diffusion's arithmetic, the reference"

    def __init__(self) -> None:
        super().__init__()
        self.ops = {
            GROUP_NORM_ACT: group_norm_act_reference,
            QKV_ATTENTION: qkv_attention_reference,
            DDPM_STEP: ddpm_step_reference,
            DDIM_STEP: ddim_step_reference,
        }


register_backend(EagerBackend())
