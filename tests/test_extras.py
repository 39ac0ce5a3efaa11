"""A module that only an extra installs fails with an ImportError naming that extra."""

import sys

import pytest

from sra_jax.extras import require


def test_missing_optional_module_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(ImportError, match=r"pip install 'sra-jax\[data\]'") as info:
        require("datasets", "data", needed_by="GSM8K loading")
    assert "GSM8K loading needs 'datasets'" in str(info.value)


def test_a_broken_dependency_of_an_installed_module_is_not_blamed_on_the_extra(tmp_path, monkeypatch):
    (tmp_path / "installed_but_broken.py").write_text("import no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_module_xyz") as info:
        require("installed_but_broken", "data", needed_by="x")
    assert "sra-jax[data]" not in str(info.value)
