"""Raw interaction readers: MovieLens-100K/1M, generic CSV, Amazon JSON lines."""

from __future__ import annotations

import gzip
import json
import logging

import pytest

from prefrec.data.raw import (
    items_without_title,
    read_amazon,
    read_interactions_csv,
    read_movielens_1m,
    read_movielens_100k,
)
from prefrec.data.schema import Interaction
from prefrec.errors import DataError


def write(path, text: str, encoding: str = "utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


# --------------------------------------------------------------------------- MovieLens-100K


def test_movielens_100k_shipped(shared_data):
    log = read_movielens_100k(shared_data / "ml-100k")
    assert len(log.events) == 100_000
    assert len({e.user for e in log.events}) == 943
    assert len(log.titles) == 1682
    # The first line of u.data, parsed field by field.
    assert log.events[0] == Interaction("196", "242", 3.0, 881250949)
    assert log.titles["1"] == "Toy Story (1995)"
    assert log.titles["1682"] == "Scream of Stone (Schrei aus Stein) (1991)"
    # u.item is latin-1: decoded, not mangled.
    assert "Misérables, Les (1995)" in log.titles.values()
    assert items_without_title(log) == set()
    assert log.source.endswith("u.data")


def test_movielens_100k_wrong_field_count(tmp_path):
    write(tmp_path / "u.data", "1\t10\t4\t100\n1\t11\t5\n")
    write(tmp_path / "u.item", "10|Heat (1995)|x\n")
    with pytest.raises(DataError) as err:
        read_movielens_100k(tmp_path)
    assert (
        str(err.value) == f"{tmp_path / 'u.data'}: record 2: expected 4 tab-separated fields, got 3"
    )


def test_movielens_100k_non_numeric_rating_and_timestamp(tmp_path):
    write(tmp_path / "u.item", "10|Heat (1995)|x\n")
    write(tmp_path / "u.data", "1\t10\tfour\t100\n")
    with pytest.raises(DataError, match=r"record 1: field 'rating': expected a number, got 'four'"):
        read_movielens_100k(tmp_path)
    write(tmp_path / "u.data", "1\t10\t4\t\n")
    with pytest.raises(DataError, match=r"record 1: field 'timestamp': expected a number, got ''"):
        read_movielens_100k(tmp_path)
    write(tmp_path / "u.data", "1\t10\t4\t12.5\n")
    with pytest.raises(DataError, match="field 'timestamp': expected an integer timestamp"):
        read_movielens_100k(tmp_path)
    write(tmp_path / "u.data", "1\t10\tnan\t12\n")
    with pytest.raises(DataError, match="field 'rating': expected a finite number"):
        read_movielens_100k(tmp_path)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="u.data: file not found"):
        read_movielens_100k(tmp_path)


# --------------------------------------------------------------------------- MovieLens-1M


def test_movielens_1m(tmp_path, caplog):
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n\n2::9::2::5\n")
    write(
        tmp_path / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi\n",
        encoding="latin-1",
    )
    with caplog.at_level(logging.WARNING, logger="prefrec.data.raw"):
        log = read_movielens_1m(tmp_path)
    assert log.events == [
        Interaction("1", "1193", 5.0, 978300760),
        Interaction("1", "661", 3.0, 978302109),
        Interaction("2", "9", 2.0, 5),
    ]
    assert log.titles == {
        "1193": "One Flew Over the Cuckoo's Nest (1975)",
        "661": "Cité des enfants perdus, La (1995)",
    }
    # Item 9 has no title: allowed, its id stands in, and it is counted and logged.
    assert log.title("9") == "9"
    assert items_without_title(log) == {"9"}
    assert "1 items have no title" in caplog.text


def test_movielens_1m_errors(tmp_path):
    write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation\n", encoding="latin-1")
    write(tmp_path / "ratings.dat", "1::1::5::978300760\n1::1::5\n")
    with pytest.raises(DataError) as err:
        read_movielens_1m(tmp_path)
    assert str(err.value) == (
        f"{tmp_path / 'ratings.dat'}: record 2: expected 4 '::'-separated fields, got 3"
    )
    # ratings.dat is UTF-8 (ASCII in practice): a stray latin-1 byte is reported on its line.
    write(tmp_path / "ratings.dat", "1::1::5::1\n1::\xe9::5::2\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"ratings.dat: record 2: not valid UTF-8"):
        read_movielens_1m(tmp_path)
    write(tmp_path / "ratings.dat", "1::1::5::1\n")
    write(tmp_path / "movies.dat", "1::Toy Story (1995)::A\n1::Heat (1995)::B\n")
    with pytest.raises(
        DataError, match=r"movies.dat: record 2: field 'title': item '1' already has"
    ):
        read_movielens_1m(tmp_path)


# --------------------------------------------------------------------------- CSV


def test_csv_custom_columns_and_titles_file(tmp_path):
    ratings = write(
        tmp_path / "r.csv",
        'uid;iid;stars;when\nu1;a;4.5;10\n\nu1;b;2;"11"\nu2;a;1;12\n',
    )
    titles = write(tmp_path / "t.csv", 'iid;name\na;Alpha\nb;"Beta; the sequel"\n')
    log = read_interactions_csv(
        ratings,
        titles,
        user_col="uid",
        item_col="iid",
        rating_col="stars",
        time_col="when",
        title_col="name",
        delimiter=";",
    )
    assert log.events == [
        Interaction("u1", "a", 4.5, 10),
        Interaction("u1", "b", 2.0, 11),
        Interaction("u2", "a", 1.0, 12),
    ]
    assert log.titles == {"a": "Alpha", "b": "Beta; the sequel"}


def test_csv_titles_from_column_and_implicit_feedback(tmp_path):
    path = write(tmp_path / "r.csv", "user,item,title\nu1,a,Alpha\nu1,b,\nu2,a,Alpha\n")
    log = read_interactions_csv(path, rating_col=None, time_col=None)
    # No rating column: implicit feedback (1.0); no time column: file order.
    assert [(e.rating, e.timestamp) for e in log.events] == [(1.0, 0), (1.0, 1), (1.0, 2)]
    assert log.titles == {"a": "Alpha"}
    assert items_without_title(log) == {"b"}


def test_csv_errors(tmp_path):
    path = write(tmp_path / "r.csv", "user,item,score,timestamp\nu1,a,4,1\n")
    with pytest.raises(DataError) as err:
        read_interactions_csv(path)
    assert str(err.value) == (
        f"{path}: record 1: field 'rating': missing column; the header has user, item, score, timestamp"
    )
    # A quoted field may span lines: records are numbered by the line they start on.
    write(path, 'user,item,rating,timestamp\nu1,"a\nb",4,1\nu1,b,x,2\n')
    with pytest.raises(DataError, match=r"record 4: field 'rating'"):
        read_interactions_csv(path)
    write(path, "user,item,rating,timestamp\nu1,a,4,1\nu1,b,good,2\n")
    with pytest.raises(DataError, match=r"record 3: field 'rating': expected a number, got 'good'"):
        read_interactions_csv(path)
    write(path, "user,item,rating,timestamp\nu1,a,4,1\nu1,b,4\n")
    with pytest.raises(DataError, match=r"record 3: expected 4 fields like the header, got 3"):
        read_interactions_csv(path)
    path.write_bytes(b"user,item,rating,timestamp\nu1,a,4,1\nu1,\xff,4,2\n")
    with pytest.raises(DataError, match=r"record 3: not valid UTF-8"):
        read_interactions_csv(path)
    write(path, "user,item,rating,timestamp\n,a,4,1\n")
    with pytest.raises(DataError, match=r"record 2: field 'user': empty id"):
        read_interactions_csv(path)
    write(path, "")
    with pytest.raises(DataError, match="empty file: expected a header row"):
        read_interactions_csv(path)


# --------------------------------------------------------------------------- Amazon


def review(user, asin, overall, time):
    return json.dumps(
        {"reviewerID": user, "asin": asin, "overall": overall, "unixReviewTime": time}
    )


def test_amazon_with_gzip_metadata(tmp_path):
    reviews = write(
        tmp_path / "reviews.json",
        "\n".join([review("A1", "B01", 5.0, 1400000000), review("A2", "B02", 2, 1400000001)])
        + "\n",
    )
    meta = tmp_path / "meta.json.gz"
    with gzip.open(meta, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"asin": "B01", "title": "Halo 3 - Xbox 360"}) + "\n")
        fh.write(json.dumps({"asin": "B02"}) + "\n")  # no title: allowed, counted
    log = read_amazon(reviews, meta)
    assert log.events == [
        Interaction("A1", "B01", 5.0, 1400000000),
        Interaction("A2", "B02", 2.0, 1400000001),
    ]
    assert log.titles == {"B01": "Halo 3 - Xbox 360"}
    assert items_without_title(log) == {"B02"}
    assert log.title("B02") == "B02"


def test_amazon_reviews_gzip_without_metadata(tmp_path):
    reviews = tmp_path / "reviews.json.gz"
    with gzip.open(reviews, "wt", encoding="utf-8") as fh:
        fh.write(review("A1", "B01", "4", 7) + "\n")
    log = read_amazon(reviews)
    assert log.events == [Interaction("A1", "B01", 4.0, 7)]
    assert log.titles == {}


def test_amazon_errors(tmp_path):
    path = tmp_path / "r.json"
    write(path, review("A1", "B01", 5, 1) + "\n{not json\n")
    with pytest.raises(DataError, match=r"r.json: record 2: invalid JSON at column 2"):
        read_amazon(path)
    write(path, json.dumps({"reviewerID": "A1", "asin": "B", "unixReviewTime": 1}) + "\n")
    with pytest.raises(DataError, match=r"record 1: field 'overall': missing field"):
        read_amazon(path)
    write(path, review("A1", "B01", True, 1) + "\n")
    with pytest.raises(DataError, match=r"field 'overall': expected a number, got True"):
        read_amazon(path)
    write(path, review("A1", "B01", 5, "yesterday") + "\n")
    with pytest.raises(DataError, match=r"field 'unixReviewTime': expected a number"):
        read_amazon(path)
    write(path, "[1, 2]\n")
    with pytest.raises(DataError, match="record 1: expected a JSON object"):
        read_amazon(path)
    write(path, review("", "B01", 5, 1) + "\n")
    with pytest.raises(DataError, match=r"field 'reviewerID': expected a non-empty id"):
        read_amazon(path)
    write(path, review("A1", "B01", 5, 1) + "\n")
    meta = write(tmp_path / "m.json", json.dumps({"asin": "B01", "title": ["x"]}) + "\n")
    with pytest.raises(DataError, match=r"m.json: record 1: field 'title': expected a string"):
        read_amazon(path, meta)
