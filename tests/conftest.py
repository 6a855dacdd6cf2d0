import os
import re
import tempfile

# offline and isolated from any user cache, before transformers / datasets are imported
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_decorr_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ------------------------------------------------------------- figures quoted in the docs


def printed(text: str, value: float) -> bool:
    """``text`` (such as ``7.7e-8``, ``+28.2``, ``0.086``) is ``value`` rounded to the digits it shows."""
    text = text.replace("−", "-").replace("+", "")
    mantissa = text.split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(text.split("e")[1]) if "e" in text else 0
    return abs(float(text) - value) <= 0.5 * 10 ** (exponent - decimals) * (1 + 1e-9)


def markdown_tables(text: str) -> list[str]:
    """The markdown tables of ``text``, each as its lines (header, rule, rows) without the final newline."""
    return [t.rstrip("\n") for t in re.findall(r"(?:^\|.*\|\n)+", text, flags=re.M)]


# ------------------------------------------------------------- launching worker processes


def free_port() -> int:
    """A free TCP port on localhost (for a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    """The environment of a launched worker: offline, one thread, the repository and tests/ importable."""
    tests = os.path.dirname(os.path.abspath(__file__))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO_ROOT, tests]),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def check_exit(what: str, returncode: int, stdout: str, stderr: str) -> None:
    """Fail the test with the tail of a worker's output when it did not exit 0."""
    if returncode != 0:
        pytest.fail(f"{what} failed (exit {returncode})\nstdout:\n{stdout[-6000:]}\nstderr:\n{stderr[-12000:]}")
