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
MULTIPROCESS_TESTS = {"test_sweep_in_two_processes_equals_one",
                      # the fault tests that run a second process (a script, a killed child, a competing run)
                      "test_a_parallel_sweep_in_a_script_without_a_main_guard_says_so",
                      "test_a_parallel_sweep_started_from_a_script_read_on_stdin_fails_clearly",
                      "test_a_second_process_training_into_a_busy_checkpoint_dir_is_refused_naming_the_first",
                      "test_a_run_killed_in_the_middle_of_a_save_leaves_a_directory_the_next_run_takes_over",
                      "test_a_save_killed_in_the_middle_of_its_swap_loses_no_checkpoint"}
SLOW_FILES = MULTIPROCESS_FILES | {"test_pretrained.py", "test_quantization_study.py",
                                   "test_claims_stability.py"}  # trains its runs in a module fixture
# the slowest single tests (pytest --durations): compilation, module entry points, fuzzing, import scans
SLOW_TESTS = MULTIPROCESS_TESTS | {"test_compile_layers_gives_the_same_logits_and_gradients", "test_runs_as_a_module",
                                   "test_fuzzed_shards_never_load_wrong_weights",
                                   "test_the_library_never_imports_the_lab_nor_its_libraries",
                                   "test_k2_router_is_three_hundredths_of_a_percent_of_its_checkpoint"}


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
