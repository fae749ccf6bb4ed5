"""The erasure certificate in the forms a ward files: JSON and CSV in Japan time, the CSV
as one table Excel and pandas read (UTF-8 with a BOM, no comment lines), and the PDF in
Japanese with every record, the ledger's head, the SP 800-88 fields and the name-and-seal
box; and ``gatewayctl erasure-report`` writing each, refusing a PDF to the terminal."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import ctl
from pypdf import PdfReader

from gateway.ops.chain import HashChainLog
from gateway.retention.certificate_pdf import as_pdf
from gateway.retention.ledger import erasure_ledger
from gateway.retention.report import (
    CHANNEL_NAMES,
    CSV_COLUMNS,
    REASON_NAMES,
    as_csv,
    certificate,
)
from gateway.testing.sandbox import Sandbox, build_sandbox

pytestmark = pytest.mark.usefixtures("hermetic_cli")

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z, 17:00 in Japan
DAY = date(2027, 1, 15)
ORGANIZATION = "テスト区 区民部 戸籍住民課 & <窓口>"  # markup characters, escaped in the PDF
OPERATOR = "security-officer-07"
CHANNELS = (*CHANNEL_NAMES, "pilot-channel")  # the last has no Japanese name
REASONS = tuple(REASON_NAMES)
DESTROYED, PENDING = "2027-01-21", "2027-01-22"


def body(n: int) -> dict[str, Any]:
    """The ledger entry of the n-th erasure: a minute apart, from 17:00 JST on DAY."""
    return {
        "submission_id": f"{int((T0 + n) * 1000):012x}{n:020x}",
        "channel": CHANNELS[n % len(CHANNELS)],
        "received_at": T0 - 3600 + n * 60,
        "delivered_at": T0 - 1800 + n * 60 if n % 2 else None,
        "erased_at": T0 + n * 60,
        "reason": REASONS[n % len(REASONS)],
        "method": "crypto-erase (test)",
        "ciphertext_sha256": f"{n:064x}",
        "key_epoch": DESTROYED if n % 3 else PENDING,
    }


def write_ledger(ledger: HashChainLog, count: int) -> None:
    ledger.append_many([body(n) for n in range(count)])
    ledger.append(
        {
            "event": "key_epoch_destroyed",
            "key_epoch": DESTROYED,
            "destroyed_at": T0 + 86400,  # 2027-01-16T17:00:00+09:00
            "records_erased_with_it": 0,
            "method": "crypto-shred (test)",
        }
    )


def make(tmp_path: Path, count: int, day: date = DAY) -> dict[str, Any]:
    ledger = HashChainLog(tmp_path / "ledger.jsonl", clock=lambda: T0, anchor=tmp_path / "a")
    write_ledger(ledger, count)
    return certificate(
        ledger, day, day, operator=OPERATOR, organization=ORGANIZATION,
        now=datetime.fromtimestamp(T0 + 7200, UTC), keystore="/var/lib/gateway-keystore",
        retention_days=7,
    )  # fmt: skip


def pdf_text(data: bytes) -> tuple[list[str], str]:
    """Each page's text, and all of it without white space (a paragraph may wrap)."""
    pages = [page.extract_text() for page in PdfReader(io.BytesIO(data)).pages]
    return pages, re.sub(r"\s+", "", "".join(pages))


def table(data: bytes) -> list[dict[str, str]]:
    """The CSV's rows keyed by the English key of each header (``受付番号 (submission_id)``)."""
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    return [{k.rsplit(" (", 1)[1].rstrip(")"): v for k, v in row.items()} for row in rows]


# ---------------------------------------------------------------------- JSON


def test_every_time_in_the_certificate_is_japan_time(tmp_path: Path) -> None:
    """received/delivered/erased/key/epoch times and generated_at: ISO 8601, +09:00."""
    cert = make(tmp_path, 6)
    assert cert["generated_at"] == "2027-01-15T19:00:00+09:00"
    first, second = cert["records"][:2]
    assert first["received_at"] == "2027-01-15T16:00:00+09:00"
    assert first["delivered_at"] is None
    assert first["erased_at"] == first["key_destroyed_at"] == "2027-01-15T17:00:00+09:00"
    assert first["epoch_destroyed_at"] is None  # epoch PENDING
    assert second["delivered_at"] == "2027-01-15T16:31:00+09:00"
    assert second["epoch_destroyed_at"] == "2027-01-16T17:00:00+09:00"
    text = json.dumps(cert)
    assert 'Z"' not in text and "+00:00" not in text
    media = cert["sanitization_record"]["media"]
    assert media["key_epochs_pending"] == [PENDING]
    assert (
        "/var/lib/gateway-keystore" in media["data_backup_ja"] and "7日" in media["data_backup_ja"]
    )


# ----------------------------------------------------------------------- CSV


def test_the_csv_is_one_table_with_a_bom_and_the_summary_on_every_row(tmp_path: Path) -> None:
    """UTF-8 with a BOM, no comment line, a row per record all as long as the header,
    each carrying the organization, operator, counts, ledger head and SP 800-88 fields."""
    cert = make(tmp_path, 14)
    data = as_csv(cert)
    assert data.startswith(b"\xef\xbb\xbf") and not data.startswith(b"\xef\xbb\xbf\xef\xbb\xbf")
    text = data.decode("utf-8-sig")
    assert not any(line.startswith("#") for line in text.splitlines())
    grid = list(csv.reader(io.StringIO(text, newline="")))
    assert {len(row) for row in grid} == {len(CSV_COLUMNS)} and len(grid) == 1 + 14
    assert grid[0][0] == "受付番号 (submission_id)" and "確認者 (operator)" in grid[0]
    rows = table(data)
    assert [r["submission_id"] for r in rows] == [body(n)["submission_id"] for n in range(14)]
    head = cert["ledger"]
    for row in rows:
        assert row["organization"] == ORGANIZATION and row["operator"] == OPERATOR
        assert row["total"] == "14" and row["period_from"] == row["period_to"] == "2027-01-15"
        assert row["ledger_head_seq"] == str(head["head_seq"]) == "15"
        assert row["ledger_head_hash"] == head["head_hash"]
        assert row["method_type"] == "Purge"
        assert row["sanitization_method"] == "Cryptographic Erase"
        assert row["tool"].startswith("jp-mynumber-gateway ")
        assert "verified" in row["verification"]
        assert row["post_sanitization_classification"] == "no personal data remains readable"
        assert "/var/lib/gateway-keystore" in row["data_backup"]
        assert row["key_epochs_pending"] == PENDING
        assert row["generated_at"] == "2027-01-15T19:00:00+09:00"
    counts = rows[0]["counts"].split("; ")
    assert "online-application/delivered=1" in counts  # n = 0; n = 7 is operator
    assert "pilot-channel/expired_undelivered=1" in counts  # n = 6
    assert sum(int(c.rsplit("=", 1)[1]) for c in counts) == 14
    first, second = rows[0], rows[1]
    assert first["erased_at"] == "2027-01-15T17:00:00+09:00" and first["delivered_at"] == ""
    assert second["epoch_destroyed_at"] == "2027-01-16T17:00:00+09:00"
    assert first["channel_name"] == "オンライン申請（申請補助端末）"
    assert first["reason_name"] == "配送時消去"
    assert rows[6]["channel"] == rows[6]["channel_name"] == "pilot-channel"  # no Japanese name


def test_a_period_without_erasures_is_one_row_of_summary(tmp_path: Path) -> None:
    """No record: one row, the record columns empty, the summary still there."""
    (row,) = table(as_csv(make(tmp_path, 3, day=date(2027, 2, 1))))
    assert row["submission_id"] == row["erased_at"] == row["channel_name"] == ""
    assert row["total"] == "0" and row["counts"] == "" and row["operator"] == OPERATOR
    assert row["ledger_entries"] == "4" and row["method_type"] == "Purge"


# ----------------------------------------------------------------------- PDF


def test_the_pdf_is_the_certificate_in_japanese(tmp_path: Path) -> None:
    """Title, labels, organization, operator, every record id in Japan time, the ledger's
    head, the channels' and reasons' Japanese names, SP 800-88, the seal box, n / N."""
    cert = make(tmp_path, 30)
    data = as_pdf(cert)
    assert data.startswith(b"%PDF-")
    pages, flat = pdf_text(data)
    whole = "".join(pages)
    for words in (
        "消去証明書", "Certificateoferasure", "対象期間", "発行者（組織）", "確認者",
        "消去実施者", "作成日時", "消去台帳の検証", "検証済み", "業務別・理由別の消去件数",
        "別紙消去記録一覧", "受付番号", "鍵エポック破棄日時", "NISTSP800-88", "消去の種別",
        "MethodType", "暗号化消去", "CryptographicErase", "バックアップの条件",
        "未破棄の鍵エポック", "記名押印欄", "所属", "職", "氏名", "日付", "印",
        "2027-01-15～2027-01-15", "JST",
    ):  # fmt: skip
        assert words in flat, words
    assert ORGANIZATION in whole and OPERATOR in whole  # escaped, shown as given
    assert cert["ledger"]["head_hash"] in whole
    assert "/var/lib/gateway-keystore" in flat and PENDING in flat
    for name in (*CHANNEL_NAMES.values(), *REASON_NAMES.values(), "pilot-channel"):
        assert name in flat, name
    for n in range(30):
        assert body(n)["submission_id"] in whole
    assert "2027-01-15 16:00:00" in whole  # the first received_at, shown in JST
    assert "2027-01-15 17:29:00" in whole  # the last erased_at
    assert "2027-01-16 17:00:00" in whole  # an epoch's destruction
    assert "2027-01-15 19:00:00 JST (+09:00)" in whole  # generated_at
    assert "08:00:00" not in whole  # no UTC time
    for n, page in enumerate(pages, 1):
        assert page.rstrip().endswith(f"\n{n} / {len(pages)}"), n
    assert pages[-1].index("記名押印欄") > pages[-1].index("バックアップの条件")


def test_the_list_of_records_repeats_its_header_on_every_page(tmp_path: Path) -> None:
    """Hundreds of records: landscape pages, each with the header row; each id once."""
    cert = make(tmp_path, 250)
    data = as_pdf(cert)
    pages, _flat = pdf_text(data)
    shapes = [(p.mediabox.width, p.mediabox.height) for p in PdfReader(io.BytesIO(data)).pages]
    listing = [p for p in pages if "submission_id" in p]
    assert len(listing) >= 6  # 250 records, 39 to a landscape page
    assert [w > h for w, h in shapes] == [False] + [True] * len(listing) + [False]
    ids = [body(n)["submission_id"] for n in range(250)]
    hex32 = r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])"
    found = [i for page in listing for i in re.findall(hex32, page)]
    assert found == ids  # every record once, in order, across the pages
    for page in listing:
        assert "受付番号" in page and "消去理由" in page and "received_at" in page


# ----------------------------------------------------------------------- CLI


@pytest.fixture
async def box(tmp_path: Path) -> Sandbox:
    sandbox = await build_sandbox(tmp_path, start_simulators=False)
    assert sandbox.config is not None
    directory = sandbox.config.spool.directory
    directory.mkdir(parents=True, exist_ok=True)
    write_ledger(erasure_ledger(directory, clock=lambda: T0), 5)
    return sandbox


def report(box: Sandbox, *options: str | Path) -> list[str | Path]:
    return [
        "erasure-report", "--config", box.config_path, "--from", "2027-01-15",
        "--to", "2027-01-15", "--operator", OPERATOR, "--organization", ORGANIZATION, *options,
    ]  # fmt: skip


def test_gatewayctl_writes_the_pdf_to_the_file_it_is_given(
    box: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certificate.pdf"
    code, stdout, err = ctl(capsys, *report(box, "--format", "pdf", "--output", out))
    assert code == 0, err
    assert stdout == "" and f"written to {out}" in err and "5 erasures" in err
    pages, flat = pdf_text(out.read_bytes())
    assert "消去証明書" in flat and "記名押印欄" in flat and ORGANIZATION in "".join(pages)
    for n in range(5):
        assert body(n)["submission_id"] in "".join(pages)
    assert "7日" in flat  # the configured retention, in the backup condition


def test_gatewayctl_refuses_a_pdf_without_output(
    box: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, err = ctl(capsys, *report(box, "--format", "pdf"))
    assert code != 0 and stdout == ""
    assert "--format pdf needs --output FILE" in err
    assert not list(tmp_path.glob("*.pdf"))
    nowhere = tmp_path / "missing" / "certificate.pdf"
    code, stdout, err = ctl(capsys, *report(box, "--format", "pdf", "--output", nowhere))
    assert code != 0 and f"{nowhere.parent} is not a directory" in err


def test_gatewayctl_writes_csv_and_json_to_stdout_or_a_file(
    box: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, err = ctl(capsys, *report(box, "--format", "csv"))
    assert code == 0, err
    assert stdout.startswith("\ufeff受付番号 (submission_id),")  # the BOM, then the header
    assert len(stdout.splitlines()) == 1 + 5
    path = tmp_path / "certificate.csv"
    code, stdout, err = ctl(capsys, *report(box, "--format", "csv", "--output", path))
    assert code == 0 and stdout == "", err
    rows = table(path.read_bytes())
    assert [r["operator"] for r in rows] == [OPERATOR] * 5
    path = tmp_path / "certificate.json"
    code, stdout, err = ctl(capsys, *report(box, "--output", path))
    assert code == 0 and stdout == "", err
    cert = json.loads(path.read_text("utf-8"))
    assert cert["records"][0]["erased_at"] == "2027-01-15T17:00:00+09:00"
    assert cert["sanitization_record"]["person_performing"]["organization"] == ORGANIZATION


def test_gatewayctl_keeps_the_certificate_in_japan_time(
    box: Sandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """--timezone shows other commands' times elsewhere; the certificate stays in JST."""
    code, stdout, err = ctl(capsys, *report(box, "--timezone", "UTC"))
    assert code != 0 and stdout == "" and "Japan time" in err
    code, stdout, err = ctl(capsys, *report(box, "--timezone", "Asia/Tokyo"))
    assert code == 0, err
    assert json.loads(stdout)["generated_at"].endswith("+09:00")
