"""Deployment targets as plain data: how much memory an adaptation step may use there.

``budget_mib`` is what edgetta may use for one adaptation step after the OS, the camera
pipeline and the application take their share; ``alignment`` is the allocator's alignment, which
rounds every tensor up (onnxruntime's CPU allocator aligns to 64 bytes).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Target:
    name: str
    arch: str
    ram_mib: int
    budget_mib: int
    provider: str = "cpu"
    float_bytes: int = 4
    alignment: int = 64
    notes: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("x86-64", "x86_64", 8192, 2048,
           notes="a small x86-64 PC or kiosk; the machine edgetta is developed and measured on"),
    Target("rpi4-4gb", "aarch64", 4096, 1024,
           notes="Raspberry Pi 4/5 class, 64-bit ARM, 4 GB (1, 2 and 8 GB boards scale the budget)"),
    Target("rpi4-1gb", "aarch64", 1024, 256, notes="Raspberry Pi 4, 1 GB"),
    Target("jetson-orin-nano", "aarch64", 8192, 2048, provider="cuda",
           notes="Jetson-class board: CPU and GPU share the 8 GB; portable engine on NVIDIA's "
                 "onnxruntime-gpu (docs/devices.md)"),
    Target("arm-sbc-512mb", "armv8", 512, 96,
           notes="small ARM single-board computer with 512 MB: a strict budget"),
]}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
