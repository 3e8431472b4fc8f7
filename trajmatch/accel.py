"""GPU speed paths for first-order work (expert training, evaluation): channels_last, bf16 autocast, TF32.

Each is a flag with 'off' (the default), 'on', or 'auto' (on when the device is CUDA). Every
default is off on every device, so a GPU run has the papers' numerics (fp32, NCHW, no TF32)
unless the user asks for a faster path. The unroll in distill.py always runs in fp32 without
autocast: its hypergradient goes through second derivatives, where bf16's 8-bit mantissa is too
coarse. With the defaults, results are exactly those of plain fp32 code (tests/test_accel.py).
"""
import argparse
import contextlib
from dataclasses import dataclass

import torch

SWITCH = ('auto', 'on', 'off')


@dataclass(frozen=True)
class Accel:
    channels_last: bool = False   # NHWC activations: tensor-core friendly convolutions
    bf16: bool = False            # autocast forward/loss to bfloat16 (weights and optimiser stay fp32)

    def net(self, net: torch.nn.Module) -> torch.nn.Module:
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def autocast(self, device: torch.device):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


FP32 = Accel()  # plain fp32, NCHW: what 'auto' gives on a CPU


def switch_on(value: str, device: torch.device) -> bool:
    return device.type == 'cuda' if value == 'auto' else value == 'on'


def add_accel_flags(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    # Off by default on every device: the papers ran fp32; these are opt-in speed paths.
    a('--channels_last', default='off', choices=SWITCH,
      help='NHWC memory format for expert training and evaluation (default off; auto: on with CUDA)')
    a('--bf16', default='off', choices=SWITCH,
      help='bfloat16 autocast for expert training and evaluation, never the unroll (default off; auto: on with CUDA)')
    a('--tf32', default='off', choices=SWITCH,
      help='TF32 matmuls/convolutions on Ampere+ GPUs, everywhere including the unroll '
           '(default off; auto: on with CUDA)')
    a('--deterministic', action='store_true',
      help="deterministic kernels where torch has them (use_deterministic_algorithms, cuDNN's deterministic "
           "algorithms, CUBLAS_WORKSPACE_CONFIG): on CUDA a resumed run then aims to equal an uninterrupted one; "
           "ops without a deterministic CUDA kernel warn (README, Resume)")


def accel_for(device: torch.device, *, channels_last: str = 'off', bf16: str = 'off', tf32: str = 'off') -> Accel:
    """The Accel these switches (SWITCH values) ask for on this device; also sets the process-wide TF32 switch."""
    set_tf32(switch_on(tf32, device))
    return Accel(channels_last=switch_on(channels_last, device), bf16=switch_on(bf16, device))


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def fp32_unroll(device: torch.device):
    """Autocast off for the unroll, whatever context the caller runs in."""
    return torch.autocast(device_type=device.type, enabled=False)
