"""`perception demo`: the one-command tour on synthetic data (README's main command).

Generates the synthetic mini set if the dataroot lacks it, checks it through the devkit, and then runs
whatever stages of the stack are available (training and evaluation are added by their issues).
"""

from __future__ import annotations

import logging
from pathlib import Path

from perception.errors import PerceptionError

log = logging.getLogger(__name__)


def ensure_synthetic(data: Path, version: str = "v1.0-mini") -> None:
    """Write the default synthetic mini set into `data` unless a dataset is already there."""
    from perception.data.synth.generate import SynthConfig, dataset_exists, generate

    if dataset_exists(data, version):
        log.info("using the dataset in %s", data)
        return
    if data.exists() and any(data.iterdir()):
        raise PerceptionError(f"{data}: exists but holds no {version} tables; pass an empty or new --data directory")
    log.info("writing the synthetic nuScenes mini set to %s (about 2 minutes)", data)
    generate(data, SynthConfig(version=version))


def run_demo(data: Path, work_dir: Path, minutes: float) -> None:
    from perception.data.check import check_dataroot

    ensure_synthetic(data)
    report = check_dataroot(data, "v1.0-mini")
    report.print()
    if report.errors:
        raise PerceptionError(f"{data}: the dataset check found {len(report.errors)} error(s); see above")
    work_dir.mkdir(parents=True, exist_ok=True)
    print(f"\nData is ready in {data}. Training and evaluation are not there yet; the demo stops here.")
