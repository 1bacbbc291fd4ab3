"""Files written atomically: never half-written, with the permissions a plain write would give."""

from __future__ import annotations


def test_an_atomic_write_gives_a_new_file_the_umask_mode_and_keeps_an_existing_files(tmp_path):
    import os

    from glmrepl.common.atomic import write_text_atomic

    old = os.umask(0o027)
    try:
        fresh = write_text_atomic(tmp_path / "new.json", "{}")
        assert fresh.stat().st_mode & 0o777 == 0o640 and fresh.read_text() == "{}"
        private = tmp_path / "private.json"
        private.write_text("old")
        private.chmod(0o600)
        write_text_atomic(private, "new")
        assert private.stat().st_mode & 0o777 == 0o600 and private.read_text() == "new"
    finally:
        os.umask(old)
