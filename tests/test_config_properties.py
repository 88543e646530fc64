"""Properties of the config: whatever the input, a valid Config or the project's own error
(one line), never an internal error; a refused `config set` leaves the file as it was."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import tomlkit
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clusterctl import config as cfg
from clusterctl.errors import ClusterctlError, ConfigError
from tests.conftest import REPO

SHIPPED = (REPO / "etc" / "clusterctl.toml").read_text()
SECTIONS = list(cfg.sections())
KEYS = sorted({key for name in SECTIONS for key in cfg.section_settings(name)})
SETTINGS = [(name, key) for name in SECTIONS for key in cfg.section_settings(name)]

# Text an operator, a typo or an attacker might write for a value.
NASTY = st.sampled_from([
    "", " ", "512M", "2G", "1.5G", "0", "-1G", "1e3G", "9" * 40 + "T", "1024T", "2048T", "NaN",
    "inf", "/", "/etc/.", "/var/lib", "/usr/..", "//etc", "/var/cache/pip", "/tmp/x",
    "/root/.cache/pip", "relative", "/var/lib/\x00x", "http://[::1", "http://h:99999",
    "http://h:port", "https://a b", "https://u@h", "https://h/?q", "http://127.0.0.1:8080",
    "https://control.example", "127.0.0.1:9408", "[::1]:9408", "127.0.0.1:²", "none",
    "command", "control", "systemd", "hibernate.target", "a/b.target", "auto", "zeros",
    "refuse", "true", "off", "caf\u00e9", "line\nbreak", "tab\there", "\u2028",
])
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=0, max_value=120),
    st.floats(min_value=0, max_value=1),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, 1, -1, 2**63, 2**63 - 1, -(2**63), 10**300, 2**40]),
    st.floats(allow_nan=True, allow_infinity=True),
    NASTY,
    st.text(max_size=30),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
    max_leaves=8)


def assert_one_project_error(errors: list[ConfigError]) -> None:
    for err in errors:
        assert isinstance(err, ConfigError)
        assert "\n" not in err.one_line(), err.one_line()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_parses_to_a_config_or_config_errors(text: str) -> None:
    config, errors = cfg.parse(text, path="c.toml")
    assert (config is None) == bool(errors)
    assert_one_project_error(errors)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(SECTIONS), st.just({}), max_size=3).flatmap(
    lambda sections: st.fixed_dictionaries({name: st.dictionaries(
        st.sampled_from(list(cfg.section_settings(name))), VALUES, max_size=2)
        for name in sections}))
    | st.dictionaries(
        st.one_of(st.sampled_from(SECTIONS), st.text(min_size=1, max_size=8)),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=8)),
                        VALUES, max_size=3),
        max_size=3))
def test_any_toml_document_parses_to_a_config_or_config_errors(
        document: dict[str, dict[str, Any]]) -> None:
    text = tomlkit.dumps(document)
    config, errors = cfg.parse(text, path="c.toml")
    assert (config is None) == bool(errors)
    assert_one_project_error(errors)
    event("accepted" if config else "refused")
    if config is not None:  # what it accepted reads back the same
        again, errors = cfg.parse(tomlkit.dumps(cfg.as_toml_dict(config)), path="again.toml")
        assert errors == [] and again == config


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SECTIONS).flatmap(lambda section: st.tuples(st.just(section),
       st.dictionaries(st.sampled_from(list(cfg.section_settings(section))), VALUES, max_size=2)
       | st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3))))
def test_with_changes_gives_a_valid_config_or_a_config_error(
        change: tuple[str, dict[str, Any]]) -> None:
    section, changes = change
    try:
        new = cfg.with_changes(cfg.Config(), section, changes)
    except ConfigError as err:
        assert "\n" not in err.one_line(), err.one_line()
        event("refused")
        return
    event("accepted")
    again, errors = cfg.parse(tomlkit.dumps(cfg.as_toml_dict(new)), path="again.toml")
    assert errors == [] and again == new
    unchanged = {f.name for f in dataclasses.fields(cfg.Config)} - {section}
    assert all(getattr(new, name) == getattr(cfg.Config(), name) for name in unchanged)


DOTTED = st.one_of(
    st.sampled_from(SETTINGS).map(".".join),
    st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(SECTIONS), st.sampled_from(KEYS)),
    st.text(max_size=20),
)
TYPED = st.one_of(NASTY, st.text(max_size=30), st.integers(0, 120).map(str),
                  st.floats(0, 1).map(str), st.integers().map(str), st.floats().map(str),
                  st.lists(NASTY, max_size=3).map(",".join))


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dotted=DOTTED, typed=TYPED)
def test_config_set_writes_a_valid_file_or_changes_nothing(dotted: str, typed: str) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "clusterctl.toml"
        path.write_text(SHIPPED)
        set_and_check(path, dotted, typed)


NOT_TABLES = st.sampled_from(['1', '"x"', "[]", "[1, 2]", "true", "1.5", "inf", "1979-05-27",
                              "07:32:00", "1979-05-27T07:32:00Z", "[[1]]", "[{a = 1}]", "{}",
                              '{max_size = "4G"}'])


@settings(max_examples=150, deadline=None)
@given(setting=st.sampled_from(SETTINGS), value=NOT_TABLES, aot=st.booleans(), typed=TYPED)
def test_config_set_where_a_section_is_not_a_table_is_a_config_error(
        setting: tuple[str, str], value: str, aot: bool, typed: str) -> None:
    """A [section] written as a value or as [[section]]: `config set` on one of its keys
    ends in a valid file or a ConfigError, and then the file is as it was."""
    section, key = setting
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "clusterctl.toml"
        path.write_text(f"[[{section}]]\n{key} = {value}\n" if aot else f"{section} = {value}\n")
        set_and_check(path, f"{section}.{key}", typed)


def set_and_check(path: Path, dotted: str, typed: str) -> None:
    """`config set` either leaves a file that loads as the config it returned, or refuses
    with one ConfigError line and leaves the file, and its directory, as they were."""
    before = path.read_bytes()
    try:
        new = cfg.set_values(path, {dotted: typed})
    except ClusterctlError as err:
        assert isinstance(err, ConfigError), err
        assert "\n" not in err.one_line(), err.one_line()
        assert path.read_bytes() == before
        assert [p.name for p in path.parent.iterdir()] == [path.name]
        event("refused")
        return
    event("accepted")
    assert cfg.load(path).config == new
