"""The price table: the review's defaults, user overrides, aliases, errors, time-priced local runs."""

from __future__ import annotations

import pytest

from moecoder.evals.prices import PriceError, PriceTable, local_cost


def test_defaults_are_the_reviews_figures():
    t = PriceTable.load()
    assert {m: t.get(m).output_per_1m for m in ("gpt-4o", "claude-3.5-sonnet", "minimax-m2.7", "deepseek-coder-v2")} \
        == {"gpt-4o": 15.0, "claude-3.5-sonnet": 15.0, "minimax-m2.7": 2.5, "deepseek-coder-v2": 0.5}
    assert t.get("MiniMax-M2.7") is t.get("minimax/minimax-m2.7")  # alias, case and provider prefix
    assert t.get("unknown-model") is None and t.usd_per_hour is None


def test_user_file_merges_over_defaults(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[models."gpt-4o"]\noutput = 10.0\ninput = 2.5\n[models."mine"]\noutput = 1\n[local]\nusd_per_hour = 4.0\n')
    t = PriceTable.load(p)
    assert t.get("gpt-4o").cost(1_000_000, 2_000_000) == pytest.approx(2.5 + 20.0)
    assert t.get("mine").output_per_1m == 1.0 and t.get("deepseek-coder-v2").output_per_1m == 0.5
    assert t.usd_per_hour == 4.0


@pytest.mark.parametrize("text,msg", [("[models.x]\ninput = 1\n", "needs a numeric 'output'"),
                                      ("[models\n", "not valid TOML")])
def test_bad_price_files(tmp_path, text, msg):
    p = tmp_path / "p.toml"
    p.write_text(text)
    with pytest.raises(PriceError, match=msg):
        PriceTable.load(p)
    with pytest.raises(PriceError, match="not found"):
        PriceTable.load(tmp_path / "missing.toml")


def test_local_cost_is_rate_times_time():
    assert local_cost(90.0, 2.0) == pytest.approx(0.05)  # 90 s at $2/hour
