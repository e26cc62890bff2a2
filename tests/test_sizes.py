"""Byte sizes in and out: one parser and one formatter for every command."""

import pytest

from mmtools.errors import UsageError
from mmtools.sizes import human_bytes, parse_size


def test_sizes_print_in_binary_units_with_one_decimal():
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 << 30) == "3.0 GiB"
    assert human_bytes(5 << 40) == "5.0 TiB"
    assert human_bytes(5 << 50) == "5120.0 TiB"


def test_a_size_rounded_up_is_never_below_the_bytes_it_stands_for():
    """The index's 'give at least' figure: rounded down, giving it back would fail."""
    n = (1 << 20) + 1  # a byte over 1 MiB
    assert human_bytes(n) == "1.0 MiB"
    assert human_bytes(n, up=True) == "1.1 MiB"
    assert parse_size(human_bytes(n, up=True).replace(" ", "")) >= n
    assert human_bytes(10.2, up=True) == "11 B"


@pytest.mark.parametrize(
    ("text", "size"), [("4GB", 4 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("100", 100)]
)
def test_sizes_parse_with_or_without_a_unit(text, size):
    assert parse_size(text) == size


def test_a_size_that_is_not_one_names_the_option():
    with pytest.raises(UsageError, match=r"^--max-memory takes a size such as 4GB or 512MB"):
        parse_size("lots")
