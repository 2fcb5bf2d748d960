"""What a stage gets to run: its config, its folder, logging, metrics, progress."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import ml_collections as mlc


class MetricWriter:
  """TensorBoard scalars (tensorboardX: no TensorFlow needed); main process only."""

  def __init__(self, logdir: Path, enabled: bool):
    self._w = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._w = SummaryWriter(str(logdir), flush_secs=30)

  def scalars(self, step: int, values: dict) -> None:
    if self._w is not None:
      for k, v in values.items():
        self._w.add_scalar(k, float(v), step)

  def image(self, step: int, tag: str, image_hwc) -> None:
    if self._w is not None:
      self._w.add_image(tag, image_hwc, step, dataformats="HWC")

  def close(self) -> None:
    if self._w is not None:
      self._w.close()


@dataclasses.dataclass
class Context:
  config: mlc.ConfigDict
  root: Path
  stage: str
  logger: logging.Logger
  process_index: int = 0
  process_count: int = 1
  progress_bars: bool = True

  @property
  def is_main(self) -> bool:
    return self.process_index == 0

  @property
  def stage_dir(self) -> Path:
    return self.root / self.stage

  def dir(self, stage: str) -> Path:
    return self.root / stage

  def writer(self) -> MetricWriter:
    return MetricWriter(self.stage_dir / "tensorboard", self.is_main)

  def progress(self, total: int, initial: int = 0, desc: str | None = None):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc or self.stage, dynamic_ncols=True,
                disable=not (self.is_main and self.progress_bars), leave=False)

  def log(self, msg: str, *args) -> None:
    if self.is_main:
      self.logger.info(msg, *args)
