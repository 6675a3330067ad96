"""Ingest a folder of images through the IngestImages stream with a progress bar (tqdm)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from vitrine.client import VitrineClient, image_files
from vitrine.v1 import retrieval_service_pb2 as pb

Outcome = pb.IngestImagesResponse.Outcome


@dataclass
class IngestReport:
    """What an ingest run did: counts per outcome, rejected items with reasons, wall time (s)."""

    total: int = 0
    outcomes: Counter = field(default_factory=Counter)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    ids: dict[str, str] = field(default_factory=dict)  # filename -> image id

    @property
    def images_per_s(self) -> float:
        """Items answered per second of wall time."""
        return self.total / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        parts = ", ".join(f"{Outcome.Name(k).lower()} {v}" for k, v in sorted(self.outcomes.items()))
        text = f"{self.total} images in {self.seconds:.2f} s ({self.images_per_s:.1f} images/s): {parts}"
        for name, reason in self.rejected[:10]:
            text += f"\n  rejected {name}: {reason}"
        return text


def ingest_folder(target: str, folder: Path, metadata_file: Path | None = None, *,
                  progress: bool = True) -> IngestReport:
    """Stream every image under `folder` to the service at `target`; return an IngestReport.

    Raises grpc.RpcError if the stream itself fails (e.g. the service is unreachable).
    """
    files = image_files(folder, metadata_file)
    report = IngestReport(total=len(files))
    start = time.perf_counter()
    with VitrineClient(target) as client, tqdm(total=len(files), unit="img", disable=not progress,
                                               desc="ingest") as bar:
        for resp in client.ingest(files):
            name = files[resp.index].path.name
            report.outcomes[resp.outcome] += 1
            report.ids[name] = resp.image_id
            if resp.outcome == Outcome.REJECTED:
                report.rejected.append((name, resp.error.message))
            bar.update(1)
    report.seconds = time.perf_counter() - start
    return report
