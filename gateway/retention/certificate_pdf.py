"""The certificate of erasure as a PDF a ward can file (消去証明書, 特記事項 12).

A4, Japanese labels with the English terms, every time in Japan time (JST, +09:00), in
ReportLab's built-in Japanese fonts (:mod:`gateway.retention.pdf_layout`). Page 1
(portrait): the title, the period, the issuer and the reviewer, the verified ledger's
head, the counts by channel and reason. Then, landscape, the attached list of every
record (別紙), its header row on each page. Last, portrait again: the NIST SP 800-88
fields, the backup condition, the key epochs still to be destroyed, and the name-and-seal
box (記名押印欄) at the end. Each page says ``n / N``.

It holds no personal data: the certificate has none (ids, times and hashes only).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from reportlab.lib import colors  # type: ignore[import-untyped]
from reportlab.lib.units import mm  # type: ignore[import-untyped]
from reportlab.platypus import (  # type: ignore[import-untyped]
    KeepTogether,
    NextPageTemplate,
    PageBreak,
    Spacer,
    Table,
    TableStyle,
)

from gateway.japan import JST
from gateway.retention.pdf_layout import (
    GOTHIC,
    GREY,
    LANDSCAPE_HEIGHT,
    LANDSCAPE_WIDTH,
    LATIN,
    MINCHO,
    MONO,
    PORTRAIT_WIDTH,
    RULE,
    SHADE,
    build,
    grid,
    heading,
    height_of,
    label,
    mono,
    para,
    register_fonts,
    under,
)
from gateway.retention.report import (
    JA,
    REASON_NAMES,
    SHARED_PREFIX,
    channel_name,
    reason_name,
)

SUBTITLE = "Certificate of erasure of server copies（サーバー上の一時保存データの消去証明書）"
HEAD_HEIGHT, ROW_HEIGHT = 24, 12
"""The list of records is one table a page, cut to fit before layout: ReportLab splits a
long table page by page at a cost that grows with its length (10,000 rows in one table
take twice as long as the whole certificate cut this way). Each has its header row."""
RECORD_HEAD = (
    ("番号", "No."), ("受付番号", "submission_id"), ("業務", "channel"),
    ("消去理由", "reason"), ("受付日時", "received_at"), ("配送日時", "delivered_at"),
    ("消去・鍵破棄日時", "erased_at"), ("鍵エポック", "key_epoch"),
    ("鍵エポック破棄日時", "epoch_destroyed_at"),
)  # fmt: skip
RECORD_WIDTHS = (28, 145, 122, 92, 76, 76, 79, 46, 80)
"""Points: the landscape frame is 745 wide. The id is 32 Courier characters; a time
``2027-01-15 17:00:00`` is 70 points of 7.5-point Helvetica."""


def shown(iso: str | None) -> str:
    """An ISO 8601 time as shown in the PDF: Japan time, ``2027-01-15 17:00:00``."""
    if not iso:
        return ""
    return datetime.fromisoformat(iso).astimezone(JST).strftime("%Y-%m-%d %H:%M:%S")


def _value(text: str, size: float = 9.5) -> Any:
    """A value: its Japanese (when known) above the English as written in the JSON."""
    japanese = JA.get(text)
    return para(text, size) if japanese is None else under(japanese, text, size, small=6.5)


# ------------------------------------------------------------------ page 1: summary


def _front(cert: Mapping[str, Any]) -> list[Any]:
    person = cert["sanitization_record"]["person_performing"]
    period = cert["period"]
    ledger = cert["ledger"]
    verdict = (
        "検証済み：ハッシュチェーンを始めから終わりまで検証し、編集・削除・順序の入替え・"
        "切り詰めはなかった。 (verified end to end)"
        if ledger["verified"]
        else "未検証 (not verified)"
    )
    rows = [
        [
            label("対象期間", "Period"),
            para(f"{period['from']} ～ {period['to']}（両日を含む。日本時間 JST, UTC+09:00）"),
        ],
        [label("発行者（組織）", "Issued by (organization)"), para(person["organization"])],
        [label("確認者", "Reviewed by"), para(person["reviewed_by"])],
        [label("消去実施者", "Performed by"), _value(person["name"])],
        [label("消去件数", "Total erasures"), para(f"{cert['total']:,} 件")],
        [label("作成日時", "Generated at"), para(f"{shown(cert['generated_at'])} JST (+09:00)")],
        [
            label("消去台帳の検証", "Erasure ledger"),
            para(f"{verdict}\n記録数 {ledger['entries']:,}、最終記録の番号 {ledger['head_seq']}"),
        ],
        [label("最終記録のハッシュ", "Ledger head hash"), mono(ledger["head_hash"])],
        [
            label("台帳ファイル", "Ledger file")
            if not str(ledger["path"]).startswith(SHARED_PREFIX)
            else label("台帳の所在", "Ledger table"),
            mono(ledger["path"]),
        ],
    ]
    return [
        para("消去証明書", 24, alignment=1, spaceAfter=6),
        para(SUBTITLE, 9.5, GOTHIC, alignment=1, textColor=GREY, spaceAfter=12),
        para(
            "セキュア伝送ゲートウェイのスプール（一時保存領域）に保存したマイナンバーカード申請"
            "データの複製を、下記の期間に下記のとおり消去したことを、改ざん検知付きの消去台帳を"
            "検証したうえで証明する。本書は個人情報を含まない（受付番号・日時・ハッシュ値のみ）。",
            spaceAfter=8,
        ),
        grid(rows, [44 * mm, PORTRAIT_WIDTH - 44 * mm]),
        KeepTogether(
            [
                heading("業務別・理由別の消去件数", "Erasures by channel and reason"),
                _counts(cert["counts"]),
            ]
        ),
    ]


def _counts(counts: Mapping[str, Mapping[str, int]]) -> Any:
    """Channels down, reasons across (those that occur), totals at the end of each."""
    if not counts:
        return para("この期間の消去はない。 (No erasures in this period.)")
    present = {reason for reasons in counts.values() for reason in reasons}
    reasons = [r for r in REASON_NAMES if r in present] + sorted(present - set(REASON_NAMES))
    head = [label("業務", "Channel")]
    head += [under(reason_name(r), r, 8, GOTHIC, small=5) for r in reasons]
    rows: list[list[Any]] = [[*head, label("計", "Total")]]
    for channel, by_reason in counts.items():
        name = channel_name(channel)
        cells = [f"{by_reason.get(r, 0):,}" for r in reasons]
        first = para(name) if name == channel else under(name, channel)
        rows.append([first, *cells, f"{sum(by_reason.values()):,}"])
    sums = [f"{sum(c.get(r, 0) for c in counts.values()):,}" for r in reasons]
    total = sum(sum(c.values()) for c in counts.values())
    rows.append([label("合計", "Total"), *sums, f"{total:,}"])
    rest = (PORTRAIT_WIDTH - 56 * mm) / (len(reasons) + 1)
    return grid(
        rows,
        [56 * mm] + [rest] * (len(reasons) + 1),
        ("LEFTPADDING", (1, 0), (-1, -1), 3),
        ("RIGHTPADDING", (1, 0), (-1, -1), 3),
        ("BACKGROUND", (0, 0), (-1, 0), SHADE),
        ("BACKGROUND", (0, -1), (-1, -1), SHADE),
        ("FONTNAME", (1, 1), (-1, -1), LATIN),
        ("ALIGN", (1, 1), (-1, -1), "RIGHT"),
        ("VALIGN", (1, 1), (-1, -1), "MIDDLE"),
    )


# ------------------------------------------------------- the attached list of records


def _records(records: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The attached list: a heading and a note, then one table per landscape page."""
    note = (
        "時刻はすべて日本時間（JST, UTC+09:00）。データ鍵の破棄日時（key_destroyed_at）は"
        "消去日時（erased_at）と同じ。鍵エポック破棄日時が空欄の記録は、その鍵エポックの破棄待ち"
        "（末尾の「未破棄の鍵エポック」）。暗号文の SHA-256（ciphertext_sha256）は CSV・JSON "
        "版に記載。"
    )
    flow: list[Any] = [
        heading("別紙　消去記録一覧", f"Records ({len(records):,})"),
        para(note, 8.5, spaceAfter=6),
    ]
    if not records:
        return [heading("別紙　消去記録一覧", "Records"), para("記録なし (none)")]
    used = height_of(flow, LANDSCAPE_WIDTH, LANDSCAPE_HEIGHT)
    fits = int((LANDSCAPE_HEIGHT - used - HEAD_HEIGHT) // ROW_HEIGHT)  # on the first page
    head = [under(ja, en, 7.5, GOTHIC, small=5.5) for ja, en in RECORD_HEAD]
    start = 0
    while start < len(records):
        rows = [head] + [
            _record_row(start + n + 1, r) for n, r in enumerate(records[start : start + fits])
        ]
        heights = [HEAD_HEIGHT] + [ROW_HEIGHT] * (len(rows) - 1)
        table = Table(rows, RECORD_WIDTHS, heights, repeatRows=1, hAlign="LEFT")
        table.setStyle(_RECORD_STYLE)
        latin = [  # a channel or reason with no Japanese name is shown as configured
            ("FONTNAME", (column, y), (column, y), LATIN)
            for y, row in enumerate(rows[1:], 1)
            for column in (2, 3)
            if row[column].isascii()
        ]
        if latin:
            table.setStyle(TableStyle(latin))
        flow.append(table)
        start += fits
        fits = int((LANDSCAPE_HEIGHT - HEAD_HEIGHT) // ROW_HEIGHT)
    return flow


def _record_row(number: int, r: Mapping[str, Any]) -> list[str]:
    return [
        str(number),
        str(r.get("submission_id", "")),
        channel_name(str(r.get("channel", ""))),
        reason_name(str(r.get("reason", ""))),
        shown(r.get("received_at")),
        shown(r.get("delivered_at")),
        shown(r.get("erased_at")),
        str(r.get("key_epoch") or ""),
        shown(r.get("epoch_destroyed_at")),
    ]


_RECORD_STYLE = TableStyle(
    [
        ("FONTNAME", (0, 1), (-1, -1), LATIN),
        ("FONTNAME", (1, 1), (1, -1), MONO),
        ("FONTNAME", (2, 1), (3, -1), MINCHO),
        ("FONTSIZE", (0, 1), (-1, -1), 7.5),
        ("FONTSIZE", (1, 1), (1, -1), 7),
        ("LEADING", (0, 1), (-1, -1), 9),
        ("ALIGN", (0, 1), (0, -1), "RIGHT"),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("BACKGROUND", (0, 0), (-1, 0), SHADE),
        ("GRID", (0, 0), (-1, -1), 0.4, RULE),
        ("TOPPADDING", (0, 1), (-1, -1), 1.5),
        ("BOTTOMPADDING", (0, 1), (-1, -1), 2.5),
        ("LEFTPADDING", (0, 0), (-1, -1), 3),
        ("RIGHTPADDING", (0, 0), (-1, -1), 3),
    ]
)


# ------------------------------------------- SP 800-88, backup condition, name and seal


def _sanitization(cert: Mapping[str, Any]) -> list[Any]:
    record = cert["sanitization_record"]
    media, done = record["media"], record["sanitization"]
    fields = [
        ("媒体の種類", "Media Type", media["type"]),
        ("媒体の所在", "Media Source", media["source"]),
        ("消去の種別", "Method Type", done["method_type"]),
        ("消去手法", "Method Used", done["method"]),
        ("消去の詳細", "Method Details", "\n".join(done["details"])),
        ("使用ツール", "Tool Used", done["tool"]),
        ("検証方法", "Verification Method", done["verification"]),
        (
            "消去後の区分",
            "Post-Sanitization Classification",
            done["post_sanitization_classification"],
        ),
        ("媒体の処置", "Media Destination", record["media_destination"]),
        ("備考", "Notes", done["notes"]),
    ]
    rows = [[label(ja, en), _value(value, 9)] for ja, en, value in fields]
    pending = media["key_epochs_pending"]
    english = media["data_backup"]
    epochs = (
        "、".join(pending) + "（破棄され次第、その記録の複製はバックアップを含め読み取り不能）"
        if pending
        else "なし（この期間の記録の鍵エポックはすべて破棄済み） (none)"
    )
    return [
        heading("消去の記録（NIST SP 800-88 の項目）", "Sanitization record (NIST SP 800-88)"),
        grid(rows, [48 * mm, PORTRAIT_WIDTH - 48 * mm]),
        heading("バックアップの条件", "Data backup"),
        para(media.get("data_backup_ja") or english, spaceAfter=3),
        para(english, 8, LATIN, textColor=GREY, wordWrap=None, spaceAfter=6),
        para(f"未破棄の鍵エポック (Key epochs pending destruction)：{epochs}", font=GOTHIC),
    ]


def _seal_box() -> Any:
    """所属・職・氏名・日付, and the seal's square beside them."""
    first, seal = 24 * mm, 32 * mm
    rows = [
        [label("所属", "Department"), "", "印"],
        [label("職", "Title"), "", ""],
        [label("氏名", "Name"), "", ""],
        [label("日付", "Date"), "　　　　　年　　　月　　　日", ""],  # a string keeps its spaces
    ]
    table = grid(
        rows,
        [first, PORTRAIT_WIDTH - first - seal, seal],
        ("SPAN", (2, 0), (2, -1)),
        ("ALIGN", (2, 0), (2, -1), "CENTER"),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("FONTNAME", (1, 3), (2, 3), MINCHO),
        ("FONTNAME", (2, 0), (2, 0), MINCHO),
        ("FONTSIZE", (2, 0), (2, 0), 14),
        ("TEXTCOLOR", (2, 0), (2, 0), colors.HexColor("#999999")),
        heights=[9 * mm] * 4,  # room to write by hand
    )
    confirm = (
        "上記の内容（バックアップの条件を含む）を確認した。 "
        "(Reviewed, including the data backup condition.)"
    )
    return KeepTogether(
        [heading("記名押印欄", "Name and seal"), para(confirm, spaceAfter=6), table]
    )


def _story(cert: Mapping[str, Any]) -> Iterator[Any]:
    yield from _front(cert)
    if cert["records"]:  # else "none", on page 1
        yield NextPageTemplate("landscape")
        yield PageBreak()
    yield from _records(cert["records"])
    yield NextPageTemplate("portrait")
    yield PageBreak()
    yield from _sanitization(cert)
    yield Spacer(1, 8)
    yield _seal_box()


def as_pdf(cert: Mapping[str, Any]) -> bytes:
    """The certificate (as :func:`gateway.retention.report.certificate` builds it) as PDF."""
    register_fonts()  # before the story: the list of records is measured as it is made
    period = cert["period"]
    footer = (
        f"消去証明書 {period['from']} ～ {period['to']}　台帳最終ハッシュ "
        f"{cert['ledger']['head_hash'][:16]}…"
    )
    return build(
        _story(cert),
        footer=footer,
        title=f"消去証明書 {period['from']} - {period['to']}",
        author=cert["sanitization_record"]["person_performing"]["organization"],
        subject="Certificate of erasure of server copies",
        creator="jp-mynumber-gateway",
    )
