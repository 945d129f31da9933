"""`moe-serve info`: the human-readable counts."""
import pytest

from moe_serve.cli.info import _human


@pytest.mark.parametrize("n, text", [
    (999, "999"), (1000, "1.0K"), (1500, "1.5K"), (999_949, "999.9K"),
    # rounded to one decimal these reach the next unit: they printed as "1000.0K" and "1000.0M"
    (999_960, "1.0M"), (999_950_000, "1.0G"), (15_999_990_000, "16.0G"),
    (2_500_000_000_000, "2.5T"), (1_234_000_000_000_000, "1234.0T"),
])
def test_human_counts_move_to_the_next_unit_when_rounding_reaches_it(n, text):
    assert _human(n) == text
