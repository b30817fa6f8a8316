"""Help that teaches: what a person reads in `--help` before their first run."""

from __future__ import annotations

import re

import click
import pytest
from conftest import cli, write_csv

from batchtts.cli import main
from batchtts.config import DEFAULT_BASE_URL, Job, Provider, RetryPolicy, Timeouts


def _commands(group: click.Group = main, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found: list[tuple[tuple[str, ...], click.Command]] = []
    for name, command in group.commands.items():
        found.append(((*prefix, name), command))
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
    return found


COMMANDS = [c for c in _commands() if not isinstance(c[1], click.Group)]


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_has_examples_and_every_option_says_what_it_does(path, command):
    result = cli(*path, "--help")
    assert result.returncode == 0
    assert re.search(r"Examples:\n +(\S+=\S+ )?batchtts ", result.stdout), path
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"batchtts {' '.join(path)} {param.opts[0]} has no help text"


def test_run_help_shows_defaults_environment_and_short_flags():
    text = " ".join(cli("run", "--help").stdout.split())  # as one line: click wraps where it likes
    for setting, name in ((Job, "concurrency"), (Job, "grace_seconds"), (RetryPolicy, "max_attempts"),
                          (Timeouts, "read"), (Timeouts, "connect"), (RetryPolicy, "backoff_max")):
        default = next(f.default for f in Job.__dataclass_fields__.values() if f.name == name) if setting is Job \
            else getattr(setting(), name)
        assert f"[default: {default}" in text, name
    assert f"default: {DEFAULT_BASE_URL}" in text and "env var: BATCHTTS_BASE_URL" in text
    assert Provider().api_key_env in text and "JOB_COMPLETION_INDEX" in text and ".env" in text
    for short in ("-o, --out", "-m, --model", "-v, --voice", "-c, --concurrency", "-n, --dry-run"):
        assert short in text


def test_serve_help_names_the_url_to_point_the_runner_at():
    text = " ".join(cli("serve", "--help").stdout.split())
    assert "BATCHTTS_BASE_URL=http://127.0.0.1:8787/api/v1 batchtts run" in text
    assert "[default: 8787" in text


def test_a_default_shown_in_help_never_overrides_the_job_file(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "en-us"}])
    (tmp_path / "job.toml").write_text(
        f'manifest = "{manifest}"\nout = "{tmp_path / "out"}"\nconcurrency = 3\n'
        '[defaults]\nmodel = "local/espeak-ng"\nformat = "wav"\n')
    assert cli("run", tmp_path / "job.toml").returncode == 0
    assert [p.name for p in (tmp_path / "out").glob("a.*")] == ["a.wav"]  # not --format's mp3
    flagged = cli("run", tmp_path / "job.toml", "-o", tmp_path / "out2", "-f", "pcm")
    assert flagged.returncode == 0 and [p.name for p in (tmp_path / "out2").glob("a.*")] == ["a.pcm"]


def test_dry_run_json_is_one_object_and_json_alone_is_refused(tmp_path):
    import json

    manifest = write_csv(tmp_path / "m.csv", [{"id": "a", "text": "Hello.", "voice": "en-us"}])
    plan = json.loads(cli("run", manifest, "-o", tmp_path / "out", "-m", "local/espeak-ng", "-n", "--json").stdout)
    assert plan["total"]["pending"] == 1 and plan["models"]["local/espeak-ng"]["estimate_usd"] == 0
    assert not (tmp_path / "out").exists()
    refused = cli("run", manifest, "-o", tmp_path / "out", "-m", "local/espeak-ng", "--json")
    assert refused.returncode == 2 and "--json goes with --dry-run" in refused.stderr


def test_unknown_commands_and_options_suggest_the_near_one():
    assert "Did you mean 'status'?" in cli("staus").stderr
    assert "Did you mean '--concurrency'?" in cli("run", "x.csv", "--concurency", "3").stderr
