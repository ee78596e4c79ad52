"""Memory metrics of the Trainer's stages, with transformers' keys (``skip_memory_metrics=False``).

Same rules as transformers' ``TrainerMemoryTracker``: for each stage (``init``, ``train``,
``eval``, ``test``) the process's resident memory at its start and end, and the peak seen while it
ran, reported as ``{stage}_mem_cpu_alloc_delta`` (end - start) and ``{stage}_mem_cpu_peaked_delta``
(peak - end, at least 0); ``{stage}_mem_gpu_*`` from the CUDA allocator when CUDA is in use.
``init`` is reported with the first other stage, with ``before_init_mem_cpu``; a stage started
inside another (evaluation during training) is not tracked.
"""

from __future__ import annotations

import threading

import psutil
import torch


class MemoryTracker:
    def __init__(self, skip: bool):
        self.skip = skip
        self.stage: str | None = None
        self.cpu: dict[str, dict[str, int]] = {}
        self.gpu: dict[str, dict[str, int]] = {}
        self.init_reported = False
        self._process = psutil.Process()
        self._peak = 0
        self._monitoring = False
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        return self._process.memory_info().rss

    def _watch_peak(self) -> None:
        # Sampled, not exact: a peak shorter than the sampling interval can be missed (as in transformers).
        while self._monitoring:
            self._peak = max(self._rss(), self._peak)
            threading.Event().wait(0.001)

    def start(self, stage: str) -> None:
        if self.skip or self.stage is not None:
            return  # nested stages (evaluate() inside train()) are part of the outer one
        self.stage = stage
        self.cpu[stage] = {"begin": self._rss()}
        self._peak = self.cpu[stage]["begin"]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.gpu[stage] = {"begin": torch.cuda.memory_allocated()}
        self._monitoring = True
        self._thread = threading.Thread(target=self._watch_peak, daemon=True)
        self._thread.start()

    def stop(self, stage: str) -> None:
        if self.skip or self.stage != stage:
            return
        self._monitoring = False
        self._thread.join()
        end = self._rss()
        cpu = self.cpu[stage]
        cpu.update(end=end, alloc=end - cpu["begin"], peaked=max(0, max(self._peak, end) - end))
        if stage in self.gpu:
            now, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            gpu = self.gpu[stage]
            gpu.update(end=now, alloc=now - gpu["begin"], peaked=max(0, peak - now))
        self.stage = None

    def stop_and_update_metrics(self, stage: str, metrics: dict) -> None:
        if self.skip or self.stage != stage:
            return
        self.stop(stage)
        stages = [stage]
        if not self.init_reported and "init" in self.cpu:
            stages.insert(0, "init")
            self.init_reported = True
            metrics["before_init_mem_cpu"] = self.cpu["init"]["begin"]
            if "init" in self.gpu:
                metrics["before_init_mem_gpu"] = self.gpu["init"]["begin"]
        for s in stages:
            for kind in ("alloc", "peaked"):
                metrics[f"{s}_mem_cpu_{kind}_delta"] = self.cpu[s][kind]
                if s in self.gpu:
                    metrics[f"{s}_mem_gpu_{kind}_delta"] = self.gpu[s][kind]
