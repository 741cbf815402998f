"""Node settings: TOML file, CLI flags win, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mar_rt.node.config import Destination, NodeConfigError, build_config


def test_flags_win_over_the_toml_file(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text(
        'aet = "FROMFILE"\nport = 10400\ndest = "PACS@10.0.0.5:104"\nspool = "/tmp/s"\n'
        'quiet_seconds = 3.5\nallow_aets = ["CT1", "CT2"]\nretry_base_s = 0.5\n'
    )
    cfg = build_config(toml, port=11112, quiet_seconds=None, allow_aets=None)
    assert cfg.aet == "FROMFILE" and cfg.port == 11112  # the flag won, None flags did not
    assert cfg.dest == Destination("PACS", "10.0.0.5", 104)
    assert cfg.spool == Path("/tmp/s") and cfg.quiet_seconds == 3.5
    assert cfg.allow_aets == ("CT1", "CT2") and cfg.retry_base_s == 0.5
    assert cfg.keep_hours == 24 and cfg.quiet_seconds == 3.5


def test_defaults_from_flags_only(tmp_path):
    cfg = build_config(None, dest="ORTHANC@127.0.0.1:4242", spool=tmp_path)
    assert (cfg.aet, cfg.port, cfg.quiet_seconds, cfg.keep_hours) == ("MARNODE", 11112, 10, 24)
    assert str(cfg.dest) == "ORTHANC@127.0.0.1:4242"


@pytest.mark.parametrize(
    "flags, words",
    [
        ({"dest": "ORTHANC:4242", "spool": "/s"}, "AET@host:port"),
        ({"dest": "O@h:4242"}, "spool is required"),
        ({"dest": "O@h:99999", "spool": "/s"}, "outside 1–65535"),
        ({"dest": "O@h:1", "spool": "/s", "aet": "A" * 17}, "not a valid AE title"),
        ({"dest": "O@h:1", "spool": "/s", "quiet_seconds": -1}, "quiet_seconds"),
    ],
)
def test_bad_settings_are_named(flags, words):
    with pytest.raises(NodeConfigError, match=words):
        build_config(None, **flags)


def test_unknown_toml_key_names_the_file(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text('dest = "A@h:1"\nspool = "/s"\nquiet = 3\n')
    with pytest.raises(NodeConfigError, match=r"node\.toml: unknown setting\(s\) quiet"):
        build_config(toml)


def test_cli_refuses_a_missing_destination(tmp_path):
    from typer.testing import CliRunner

    from mar_rt.cli import app

    out = CliRunner().invoke(app, ["node", "--spool", str(tmp_path / "s")])
    assert out.exit_code == 2 and "dest is required" in out.output
    out = CliRunner().invoke(
        app, ["node", "--spool", str(tmp_path), "--dest", "A@h:1", "--bundle", str(tmp_path)]
    )
    assert out.exit_code == 2 and "no bundle.json" in out.output
    out = CliRunner().invoke(app, ["node", "status", "--spool", str(tmp_path / "nothing")])
    assert out.exit_code == 2 and "no such spool folder" in out.output


def test_spool_budgets_from_the_flags_reach_the_node_spool(tmp_path):
    """``--spool-max-mb`` / ``--min-free-mb`` become the byte budgets the spool refuses with
    0xA700 (tests/node/test_scp.py checks that refusal); a budget of 0 MB is refused by name."""
    from typer.testing import CliRunner

    from mar_rt.cli import app
    from mar_rt.node.service import MarNode

    cfg = build_config(
        None, dest="O@127.0.0.1:4242", spool=tmp_path / "s", spool_max_mb=1.5, min_free_mb=2
    )
    spool = MarNode(cfg).spool
    assert (spool.max_bytes, spool.min_free_bytes) == (1.5 * 2**20, 2 * 2**20)
    args = ["node", "--dest", "O@h:1", "--spool", str(tmp_path / "s"), "--spool-max-mb", "0"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2 and "spool_max_mb must be > 0" in out.output
