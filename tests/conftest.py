"""Markers for the suite (see README, Tests):

- ``claim``: a notebook claim's negative and positive controls (tests named ``test_claim_...``);
- ``reference``: parity with the reference implementations (transformers' DeepseekV3, torch's Muon and
  AdamW): every test of ``test_reference_parity.py`` and every test whose name says what it is compared
  with (``..._transformers...``, ``..._torch_muon...``, ``..._torch_adamw...``, ``..._torch_compatible...``);
- ``multiprocess``: starts other processes (DDP, expert parallelism, torchrun, sweeps with jobs > 1);
- ``slow``: takes more than a few seconds on one core; ``pytest -m "not slow"`` is the quick loop
  (``make test-fast``).

Markers are given here by name, so a new test is marked by where it lives and what it is called.
"""

import re

import pytest

REFERENCE_FILES = {"test_reference_parity.py"}
REFERENCE_NAMES = re.compile(r"transformers|torch_muon|torch_adamw|torch_compatible")
MULTIPROCESS_FILES = {"test_train_ddp.py", "test_parallel_experts.py", "test_parallel_train.py",
                      "test_lab_expert_parallel.py"}
MULTIPROCESS_TESTS = {"test_sweep_in_two_processes_equals_one"}
SLOW_FILES = MULTIPROCESS_FILES | {"test_pretrained.py", "test_quantization_study.py"}
# the slowest single tests (pytest --durations): compilation, module entry points, fuzzing, import scans
SLOW_TESTS = MULTIPROCESS_TESTS | {"test_compile_layers_gives_the_same_logits_and_gradients", "test_runs_as_a_module",
                                   "test_fuzzed_shards_never_load_wrong_weights",
                                   "test_the_library_never_imports_the_lab_nor_its_libraries"}


def pytest_configure(config):
    config.addinivalue_line("markers", "claim: a checked notebook claim's negative and positive controls")
    config.addinivalue_line("markers", "reference: parity with transformers' DeepseekV3 or torch's Muon / AdamW")
    config.addinivalue_line("markers", "multiprocess: starts other processes")
    config.addinivalue_line("markers", "slow: more than a few seconds on one core")


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        if item.name.startswith("test_claim_"):
            item.add_marker(pytest.mark.claim)
        test = item.originalname or item.name
        if name in REFERENCE_FILES or REFERENCE_NAMES.search(test):
            item.add_marker(pytest.mark.reference)
        if name in MULTIPROCESS_FILES or test in MULTIPROCESS_TESTS:
            item.add_marker(pytest.mark.multiprocess)
        if name in SLOW_FILES or test in SLOW_TESTS or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
