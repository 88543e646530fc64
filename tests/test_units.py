import pytest

from clusterctl.units import GIB, MIB, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * MIB),
        ("2G", 2 * GIB),
        ("1.5G", GIB + GIB // 2),
        ("2GiB", 2 * GIB),
        ("2gb", 2 * GIB),
        (" 16G ", 16 * GIB),
        ("4096", 4096),
        ("1T", 1024 * GIB),
    ],
)
def test_sizes_as_operators_write_them(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "2X", "-1G", "two", "1.5", "2 G B"])
def test_bad_sizes_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|whole number"):
        parse_size(text)


@pytest.mark.parametrize(
    ("size", "text"),
    [(2 * GIB, "2G"), (GIB + GIB // 2, "1.5G"), (512 * MIB, "512M"), (300, "300B")],
)
def test_sizes_read_back_the_way_they_are_written(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(format_size(size)) == size
