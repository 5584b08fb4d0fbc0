"""atomic_write: the new content appears whole, or the old one stays."""

import pytest

from k2mini.atomic import atomic_write


def test_writes_text_and_bytes(tmp_path):
    with atomic_write(tmp_path / "sub" / "a.txt", "w") as f:
        f.write("héllo")
    assert (tmp_path / "sub" / "a.txt").read_text(encoding="utf-8") == "héllo"
    with atomic_write(tmp_path / "b.bin") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half of the new")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_nothing_visible_before_the_block_ends(tmp_path):
    target = tmp_path / "a.txt"
    with atomic_write(target, "w") as f:
        f.write("x")
        assert not target.exists()
    assert target.read_text() == "x"


def test_rejects_other_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "a", "a"):
            pass


def test_permissions_are_those_of_a_plain_new_file(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    with atomic_write(tmp_path / "atomic", "w") as f:
        f.write("x")
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode  # not mkstemp's private 0600


def test_temp_dir_is_new_empty_and_not_private(tmp_path):
    from k2mini.atomic import temp_dir

    (tmp_path / "plain").mkdir()
    a, b = temp_dir(tmp_path / "sub", ".x-"), temp_dir(tmp_path / "sub", ".x-")
    assert a != b and a.parent == tmp_path / "sub" and a.name.startswith(".x-") and not any(a.iterdir())
    assert a.stat().st_mode == (tmp_path / "plain").stat().st_mode  # not mkdtemp's private 0700
