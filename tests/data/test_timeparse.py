import pandas as pd

from gts_lum.data.timeparse import to_utc


def test_every_granularity_and_form():
    cells = pd.Series(
        ["2024-03", "2024-03-01", "2024-03-01 08:15:02", "2024-03-01T08:15:02+02:00", "1709280902", "1709280902000", "nope", None]
    )
    got = to_utc(cells, "Europe/Berlin").astype(str).tolist()
    assert got == [
        "2024-02-29 23:00:00+00:00",  # a month, local midnight in Berlin (UTC+1 in winter)
        "2024-02-29 23:00:00+00:00",
        "2024-03-01 07:15:02+00:00",
        "2024-03-01 06:15:02+00:00",
        "2024-03-01 08:15:02+00:00",  # unix seconds
        "2024-03-01 08:15:02+00:00",  # unix milliseconds, told apart by magnitude
        "NaT",
        "NaT",
    ]


def test_dst_gap_and_fold_do_not_lose_rows():
    got = to_utc(pd.Series(["2024-03-31 02:30", "2024-10-27 02:30"]), "Europe/Berlin")
    assert got.notna().all()
    assert got.astype(str).tolist() == ["2024-03-31 01:00:00+00:00", "2024-10-27 01:30:00+00:00"]


def test_typed_columns():
    naive = pd.Series(pd.to_datetime(["2024-01-01 08:00"]))
    assert to_utc(naive, "Asia/Shanghai").astype(str).tolist() == ["2024-01-01 00:00:00+00:00"]
    assert to_utc(pd.Series([0, 86400]), "Asia/Shanghai").astype(str).tolist() == ["1970-01-01 00:00:00+00:00", "1970-01-02 00:00:00+00:00"]


def test_a_time_without_a_date_is_unreadable_not_today():
    cells = pd.Series(["12:30", "12:30:00", "8:15 PM", "03/01/2024 08:00", "March 2024"])
    got = to_utc(cells, "UTC").astype(str).tolist()
    assert got == ["NaT", "NaT", "NaT", "2024-03-01 08:00:00+00:00", "2024-03-01 00:00:00+00:00"]
