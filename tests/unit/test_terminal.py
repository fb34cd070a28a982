"""Commands a person runs print tables on a terminal and JSON lines for programs (or with --json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moderator import terminal
from moderator.cli import main
from moderator.terminal import table

ROOT = Path(__file__).resolve().parents[2]


def test_table_aligns_columns_and_right_aligns_numbers():
    text = table([{"name": "weapons", "flag": 0.9, "n": 12}, {"name": "gore", "flag": 0.85, "n": 3}],
                 ["name", "flag", "n"])  # fmt: skip
    lines = text.splitlines()
    assert lines[0].split() == ["name", "flag", "n"] and set(lines[1]) <= {"-", " "}
    assert lines[2] == "weapons   0.9  12" and lines[3] == "gore     0.85   3"


@pytest.fixture
def on_a_terminal(monkeypatch):
    monkeypatch.setattr(terminal, "is_terminal", lambda stream: True)


def test_models_as_a_table_on_a_terminal_and_json_with_the_flag(capsys, monkeypatch, tmp_path, on_a_terminal):
    monkeypatch.setenv("MODERATOR_MODEL_CACHE_DIR", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["checkpoint", "architecture", "input"]
    assert re.search(r"^openai/clip-vit-large-patch14 +ViT-L/14 +224 +768 +no", out, re.M) and "{" not in out
    assert main(["models", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and rows[0]["model"] == "openai/clip-vit-base-patch32"


def test_policy_check_as_tables_on_a_terminal(capsys, on_a_terminal):
    assert main(["policy", "check", str(ROOT / "policies")]) == 0
    captured = capsys.readouterr()
    assert "community-standards (default)  sha256:" in captured.out
    assert "kids-platform  sha256:" in captured.out
    assert "weapons" in captured.out and "{" not in captured.out
    assert "2 valid, none invalid" in captured.err


def test_policy_check_prints_json_lines_when_piped(capsys):
    assert main(["policy", "check", str(ROOT / "policies")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["policy"], r["default"]) for r in rows] == [("community-standards", True), ("kids-platform", False)]


def test_topics_list_names_every_registry_topic(capsys):
    assert main(["topics", "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["key"]: r["env"] for r in rows}["dead_letters"] == "MODERATOR_TOPIC_DEAD_LETTERS"
