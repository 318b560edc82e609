import os

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

DEVICE_ENV = "PEFT_FISHERTUNE_TEST_DEVICE"


def pytest_addoption(parser):
    parser.addoption(
        "--device", default=os.environ.get(DEVICE_ENV, "cpu"),
        help=f"device of the device-independent checks (tests/test_on_device.py): cpu (default), cuda, cuda:N; "
             f"also read from ${DEVICE_ENV}",
    )


def pytest_configure(config):
    name = config.getoption("--device")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise pytest.UsageError(f"--device / ${DEVICE_ENV}={name!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        # never fall back to the CPU silently: a GPU check that ran on the CPU would look like a pass
        raise pytest.UsageError(f"--device / ${DEVICE_ENV}={name!r} asks for CUDA, but torch.cuda.is_available() "
                                f"is False (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device / ${DEVICE_ENV}={name!r}: expected cpu or cuda[:N]")


def pytest_report_header(config):
    name = config.getoption("--device")
    if torch.device(name).type == "cuda":
        return f"test device: {name} ({torch.cuda.get_device_name(torch.device(name))}, torch {torch.__version__}, " \
               f"CUDA {torch.version.cuda})"
    return f"test device: {name}"


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device named by --device / $PEFT_FISHERTUNE_TEST_DEVICE (default cpu)."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture
def exact_fp32():
    """fp32 matmuls and convolutions without TF32 on CUDA (so fp32 comparisons mean fp32), restored after."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """Two tiny synthetic domains (clean, fog) in the Cityscapes layout, shared by the trainer tests."""
    from peft_fishertune.data import generate_synthetic_domains

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_domains(root, styles=("clean", "fog"), num_images={"train": 6, "val": 2}, size=(128, 64),
                               progress=False)
    return root
