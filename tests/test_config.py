"""authsrv.toml: the rendered default decodes to exactly the defaults, mentions every field with a
comment, and bad files are refused with errors that name the key or line."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from authsrv.config import (
    ClusterConfig,
    Config,
    ConfigError,
    HoldsConfig,
    MccRule,
    PartnerConfig,
    api_url_problem,
    append_partner_config,
    decode_config,
    load_config,
    render_default_config,
)

DEMO = {"demo": PartnerConfig(collateral="deposit")}


def _struct_fields(struct_type: type) -> list[msgspec.structs.FieldInfo]:
    return list(msgspec.structs.fields(struct_type))


def _write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "authsrv.toml").write_text(text)
    return tmp_path


def test_rendered_default_decodes_to_the_defaults(tmp_path: Path) -> None:
    assert decode_config(render_default_config().encode()) == Config()
    config = load_config(_write(tmp_path, render_default_config(DEMO)))
    assert config == Config(partners={"demo": PartnerConfig()})
    assert config.server.host == "127.0.0.1"
    assert (config.server.iso_port, config.server.rest_port, config.server.metrics_port) == (8583, 8443, 9108)
    assert config.iso.budget_ms == 250 and config.iso.frame_size_max == 8192
    assert config.ledger.snapshot_interval_records == 500_000
    assert config.duplicates.retention_hours == 24
    assert config.sessions.customer_token_ttl_s == 600
    assert config.partners["demo"].collateral == "deposit"
    assert config.partners["demo"].balance_mode == "internal"


def test_every_field_appears_with_a_comment() -> None:
    text = render_default_config(DEMO)
    lines = text.splitlines()
    for section in _struct_fields(Config):
        if section.name == "partners":
            assert "[partners.demo]" in lines
            continue
        if section.name == "cluster":  # off by default: shown commented out, each setting explained
            assert "# [cluster]" in lines
            for field in _struct_fields(ClusterConfig):
                assert re.search(rf"^# {field.name} = ", text, re.MULTILINE), f"cluster.{field.name}"
            continue
        assert f"[{section.name}]" in lines, section.name
        for field in _struct_fields(section.type):
            assert re.search(rf"^{field.name} = ", text, re.MULTILINE), f"{section.name}.{field.name}"
    for field in _struct_fields(PartnerConfig):
        assert re.search(rf"^{field.name} = ", text.split("[partners.demo]")[1], re.MULTILINE)
    for field in _struct_fields(MccRule):
        assert f"{field.name} = " in text
    # Every `key = value` line at the start of a line is directly preceded by a comment.
    for number, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            assert lines[number - 1].startswith("#"), f"no comment above {line!r}"


def test_every_setting_is_settable(tmp_path: Path) -> None:
    text = """
[server]
host = "127.0.0.2"
iso_port = 0
rest_port = 18443
metrics_port = 19108
[iso]
budget_ms = 100
in_flight_per_connection_max = 8
connections_max = 16
idle_timeout_s = 30
frame_size_max = 4096
shutdown_grace_s = 1
[ledger]
snapshot_interval_records = 1000
segment_size_max_bytes = 1048576
[holds]
expiry_days_default = 5
mcc_rules = [{ mcc_from = 5411, mcc_to = 5411, days = 2 }]
[duplicates]
retention_hours = 48
[sessions]
customer_token_ttl_s = 60
[partners.acme]
balance_mode = "external"
collateral = "credit"
api_url = "http://127.0.0.1:9000/api"
notify = ["transaction", "otp"]
stand_in = "decline"
"""
    config = load_config(_write(tmp_path, text))
    assert config.server.host == "127.0.0.2" and config.server.iso_port == 0
    assert config.iso.in_flight_per_connection_max == 8
    assert config.holds.mcc_rules == (MccRule(mcc_from=5411, mcc_to=5411, days=2),)
    assert config.holds.expiry_days(5411) == 2 and config.holds.expiry_days(3000) == 5
    acme = config.partners["acme"]
    assert (acme.balance_mode, acme.collateral, acme.notify) == ("external", "credit", ("transaction", "otp"))
    # Sections may be left out entirely: they take their defaults.
    assert load_config(_write(tmp_path, "[iso]\nbudget_ms = 99\n")).server == Config().server


def test_hold_expiry_by_mcc() -> None:
    holds = HoldsConfig()
    assert [holds.expiry_days(mcc) for mcc in (3000, 3500, 3999, 4411, 7011, 7512)] == [30] * 6
    assert [holds.expiry_days(mcc) for mcc in (2999, 4000, 4412, 5411, 7010, 7513)] == [7] * 6
    assert holds.expiry == holds.mcc_rules


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("iso_port = 8583", "iso_prot = 8583"), "unknown field `iso_prot` - at `$.server`"),
        (("budget_ms = 250", 'budget_ms = "fast"'), "$.iso.budget_ms"),
        (("budget_ms = 250", "budget_ms = 0"), "$.iso.budget_ms"),
        (("iso_port = 8583", "iso_port = 70000"), "$.server.iso_port"),
        (("frame_size_max = 8192", "frame_size_max = 100000"), "$.iso.frame_size_max"),
        (("[ledger]", "[ledger"), "at line "),
        (("mcc_from = 4411,", "mcc_from = 4412,"), "$.holds.mcc_rules[1]"),
        (('collateral = "deposit"', 'collateral = "gold"'), "$.partners.demo.collateral"),
        (('balance_mode = "internal"', 'balance_mode = "both"'), "$.partners.demo.balance_mode"),
        (("notify = []", 'notify = ["sms"]'), "$.partners.demo.notify[0]"),
        (("notify = []", 'notify = ["otp", "otp"]'), "$.partners.demo"),
        (('stand_in = "decline"', 'stand_in = "maybe"'), "$.partners.demo.stand_in"),
        (('stand_in = "decline"', 'stand_in = "decline"\ncolour = "red"'), "`colour` - at `$.partners.demo`"),
        (("[partners.demo]", "[partners.Demo]"), "$.partners"),
        (('api_url = ""', 'api_url = "http://partner.example.com"'), "loopback"),
        (('api_url = ""', 'api_url = "ftp://127.0.0.1"'), "http(s) URL"),
    ],
)
def test_bad_config_is_refused_naming_the_key(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    text = render_default_config(DEMO)
    old, new = change
    assert old in text
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path, text.replace(old, new, 1)))
    assert expected in str(caught.value)
    assert "authsrv.toml" in str(caught.value)


def test_syntax_error_line_number_is_right(tmp_path: Path) -> None:
    text = render_default_config(DEMO)
    line_number = text.splitlines().index("[ledger]") + 1
    with pytest.raises(ConfigError, match=f"line {line_number}"):
        load_config(_write(tmp_path, text.replace("[ledger]", "[ledger", 1)))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "url",
    ["", "http://127.0.0.1:9000", "http://localhost/api", "http://[::1]:8080/", "http://127.9.9.9",
     "https://partner.example.com/api", "https://10.0.0.1"],
)  # fmt: skip
def test_api_url_accepted(url: str) -> None:
    assert api_url_problem(url) == ""
    assert PartnerConfig(api_url=url).api_url == url


@pytest.mark.parametrize(
    "url",
    ["http://partner.example.com", "http://10.0.0.1:80", "http://localhost.example.com",
     "partner.example.com", "https://", "file:///etc/passwd", "http://0.0.0.0"],
)  # fmt: skip
def test_api_url_refused(url: str) -> None:
    assert api_url_problem(url) != ""


def test_append_partner_keeps_the_text_and_refuses_duplicates(tmp_path: Path) -> None:
    original = render_default_config(DEMO) + "# operator's own note\n"
    _write(tmp_path, original)
    append_partner_config(tmp_path, "acme")
    text = (tmp_path / "authsrv.toml").read_text()
    assert text.startswith(original)
    assert "[partners.acme]" in text
    config = load_config(tmp_path)
    assert set(config.partners) == {"demo", "acme"}
    assert config.partners["acme"] == PartnerConfig()
    with pytest.raises(ConfigError, match="already exists"):
        append_partner_config(tmp_path, "acme")
    with pytest.raises(ConfigError, match="must match"):
        append_partner_config(tmp_path, "Not Valid")
    assert (tmp_path / "authsrv.toml").read_text() == text
    assert not (tmp_path / "authsrv.toml.tmp").exists()


def test_the_server_takes_the_gil_switch_interval_from_its_config():
    import sys

    from authsrv.app import apply_gil_switch_interval
    from authsrv.config import decode_config, render_default_config

    config = decode_config(render_default_config().encode(), source="authsrv.toml")
    assert config.server.gil_switch_interval_ms == 1.0  # not Python's 5 ms (docs/benchmarks.md, section 6)
    before = sys.getswitchinterval()
    try:
        apply_gil_switch_interval(msgspec.structs.replace(
            config, server=msgspec.structs.replace(config.server, gil_switch_interval_ms=2.5)))
        assert sys.getswitchinterval() == 0.0025
    finally:
        sys.setswitchinterval(before)
