"""The certificate of erasure for a period (特記事項 11–12: 消去証明書), and its CSV.

Built from the hash-chained erasure ledger, which is verified first: a broken chain is
an error that says where it breaks, never a report. Entries are taken per submission,
the last one winning (a crash between ledger and erasure records one twice). The
certificate carries the fields NIST SP 800-88 asks of a sanitization record. Every time
in it is Japan time, ISO 8601 with ``+09:00``, like the period it covers.

For each record it says when its own data key was destroyed (the server copy became
unreadable) and when its key epoch was destroyed (every backup copy became unreadable),
or that the epoch is still to be destroyed. It does not claim the spool is not backed
up: it states the one backup condition the erasure depends on, for the ward to sign.
With the shared backend (PostgreSQL) the ledger is a table, the keystore a schema
(``postgresql:gateway_keys``), and the media and the condition are said of those.

The CSV is one rectangular table for Excel and ``pandas.read_csv``: UTF-8 with a BOM,
Japanese headers with the English key, one row per record, the certificate's summary
repeated on each row (one row of summary alone when the period has no erasures).
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import date, datetime, time, timedelta
from typing import Any

from gateway import __version__
from gateway.japan import JST
from gateway.ops.chain import GENESIS, ChainEntry, HashChainLog
from gateway.ops.pgchain import ChainLog

EPOCH_EVENT = "key_epoch_destroyed"
TITLE = "消去証明書（サーバー上の一時保存データ） / Certificate of erasure of server copies"

CHANNEL_NAMES = {
    "online-application": "オンライン申請（申請補助端末）",
    "express-issuance": "特急発行申請",
    "overseas-application": "国外転出者向け申請",
    "card-delegation-batch": "カード管理業務委任データ",
    "issuance-reservation": "交付予約",
    "window-reception": "交付窓口受付",
}
"""The channels' Japanese names; a channel not listed is shown by its configured name."""
REASON_NAMES = {
    "delivered": "配送時消去",
    "expired_undelivered": "保存期間満了（未配送）",
    "operator": "運用者による消去",
    "epoch_destroyed": "鍵エポック破棄",
    "retention": "保存期間満了",
}
"""Why a copy was erased, in Japanese; an unknown reason is shown as written."""

RECORD_COLUMNS = {
    "submission_id": "受付番号",
    "channel": "業務",
    "channel_name": "業務名",
    "received_at": "受付日時",
    "delivered_at": "配送日時",
    "erased_at": "消去日時",
    "reason": "消去理由",
    "reason_name": "消去理由（名称）",
    "method": "消去方法",
    "ciphertext_sha256": "暗号文のSHA-256",
    "key_destroyed_at": "データ鍵の破棄日時",
    "key_epoch": "鍵エポック",
    "epoch_destroyed_at": "鍵エポックの破棄日時",
}
SUMMARY_COLUMNS = {
    "title": "表題",
    "period_from": "対象期間（開始日）",
    "period_to": "対象期間（終了日）",
    "organization": "発行者（組織）",
    "operator": "確認者",
    "performed_by": "消去実施者",
    "generated_at": "作成日時",
    "total": "消去件数",
    "counts": "業務別・理由別件数",
    "ledger_verified": "消去台帳の検証",
    "ledger_entries": "消去台帳の記録数",
    "ledger_head_seq": "消去台帳の最終番号",
    "ledger_head_hash": "消去台帳の最終ハッシュ",
    "method_type": "消去の種別",
    "sanitization_method": "消去手法",
    "tool": "使用ツール",
    "verification": "検証方法",
    "post_sanitization_classification": "消去後の区分",
    "data_backup": "バックアップの条件",
    "data_backup_ja": "バックアップの条件（日本語）",
    "key_epochs_pending": "未破棄の鍵エポック",
}
CSV_COLUMNS = {**RECORD_COLUMNS, **SUMMARY_COLUMNS}
"""Every CSV column: its key and its Japanese header, shown as ``受付番号 (submission_id)``."""

PERFORMER = "gatewayd (automatic retention sweeper)"
MEDIA_TYPE = "spool records: one encrypted file per submission, SQLite index"
MEDIA_TYPE_SHARED = (
    "spool records: one encrypted record per submission in a PostgreSQL database shared "
    "by the gateway nodes"
)
MEDIA_SOURCE = "secure transmission gateway spool"
VERIFICATION = (
    "hash-chained erasure ledger verified end to end; each record erased only after its "
    "ledger entry was written"
)
CLASSIFICATION = "no personal data remains readable"
NOTES = (
    "a record's data key is wrapped by its key epoch's key; destroying the epoch key "
    "(overwritten, fsynced, unlinked, directory fsynced) leaves the record's copies in "
    "backups, free blocks and the index's WAL unreadable, on the backup condition below"
)
NOTES_SHARED = (
    "a record's data key is wrapped by its key epoch's key; destroying the epoch key (its "
    "row deleted and a tombstone written in one transaction, the keystore's tables "
    "vacuumed) leaves the record's copies in backups, old row versions and the WAL "
    "unreadable, on the backup condition below"
)
DESTINATION = "reused (the spool continues in service)"
JA = {
    "Purge": "除去（パージ）",
    "Cryptographic Erase": "暗号化消去",
    PERFORMER: "gatewayd（保存期間を管理する自動消去処理）",
    MEDIA_TYPE: "スプールの記録：申請ごとに暗号化した1ファイルとSQLiteの索引",
    MEDIA_SOURCE: "セキュア伝送ゲートウェイのスプール（一時保存領域）",
    VERIFICATION: "ハッシュチェーンで連結した消去台帳を始めから終わりまで検証済み。各記録は、"
    "その台帳記録を書き込んだ後にのみ消去している",
    CLASSIFICATION: "読み取り可能な個人情報は残っていない",
    NOTES: "各記録のデータ鍵は、その鍵エポックの鍵で暗号化（ラップ）している。エポック鍵を"
    "破棄する（上書き・fsync・削除・ディレクトリのfsync）と、バックアップ、未使用領域、索引の"
    "WAL にある記録の複製も読み取れなくなる（下記のバックアップの条件のもとで）",
    DESTINATION: "再利用（スプールは引き続き使用）",
    MEDIA_TYPE_SHARED: "スプールの記録：申請ごとに暗号化した1件の記録（ゲートウェイの各ノードが"
    "共有する PostgreSQL データベース）",
    NOTES_SHARED: "各記録のデータ鍵は、その鍵エポックの鍵で暗号化（ラップ）している。エポック鍵を"
    "破棄する（その行の削除と破棄記録の書込みを1つのトランザクションで行い、鍵保管庫の表を"
    "VACUUM する）と、バックアップ、行の旧版、WAL にある記録の複製も読み取れなくなる（下記の"
    "バックアップの条件のもとで）",
}
"""The Japanese of the certificate's fixed English texts, kept beside them."""


def period_bounds(start: date, end: date) -> tuple[float, float]:
    """[start 00:00 JST, end+1 00:00 JST) as epoch seconds: both days included."""
    first = datetime.combine(start, time(), JST)
    after = datetime.combine(end + timedelta(days=1), time(), JST)
    return first.timestamp(), after.timestamp()


def jst_iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 in Japan time (``2027-01-15T17:00:00+09:00``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, JST).isoformat(timespec="seconds")


def channel_name(channel: str) -> str:
    """A channel's Japanese name, or its configured name when it has none."""
    return CHANNEL_NAMES.get(channel, channel)


def reason_name(reason: str) -> str:
    """A reason's Japanese name, or the reason as written when it has none."""
    return REASON_NAMES.get(reason, reason)


def select(
    entries: Iterable[ChainEntry], start: float, end: float
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The period's erasures, one per submission (the last entry wins), oldest first; and
    when each key epoch was destroyed (any time: an epoch outlives its records' erasure)."""
    latest: dict[str, dict[str, Any]] = {}
    epochs: dict[str, float] = {}
    for entry in entries:
        body = dict(entry.body)
        if body.get("event") == EPOCH_EVENT:
            epochs[str(body["key_epoch"])] = float(body["destroyed_at"])
            continue
        erased_at = body.get("erased_at")
        if isinstance(erased_at, int | float) and start <= erased_at < end:
            latest[str(body.get("submission_id"))] = body
    records = sorted(latest.values(), key=lambda b: (b["erased_at"], b["submission_id"]))
    return records, epochs


def backup_condition(keystore: str | None, retention_days: int | None) -> tuple[str, str]:
    """The one backup condition the erasure depends on, in English and in Japanese (of
    a keystore in PostgreSQL, ``postgresql:SCHEMA``: how its backups leave it out)."""
    kept = f"{retention_days} days" if retention_days else "the longest retention"
    kept_ja = f"{retention_days}日" if retention_days else "最長の保存期間"
    if keystore and keystore.startswith(SHARED_PREFIX):
        return _shared_backup_condition(keystore.removeprefix(SHARED_PREFIX), kept, kept_ja)
    store = f"keystore {keystore}" if keystore else "keystore"
    store_ja = f"鍵保管庫 {keystore} " if keystore else "鍵保管庫"
    english = (
        f"Backups of the spool may exist. Their copies of these records became unreadable "
        f"when each record's key epoch was destroyed (epoch_destroyed_at), provided the "
        f"{store} is excluded from every backup or its backups are deleted within {kept}, "
        "and the master key of any backup taken before key epochs was retired and "
        "destroyed. The ward states that this condition holds by signing this certificate."
    )
    japanese = (
        "スプールのバックアップが存在する場合がある。バックアップにあるこれらの記録の複製は、"
        "各記録の鍵エポックが破棄された時点（鍵エポックの破棄日時、epoch_destroyed_at）で"
        f"読み取り不能となる。ただし、{store_ja}をバックアップの対象外とするか、そのバック"
        f"アップを{kept_ja}以内に削除すること、及び鍵エポック導入前のバックアップの"
        "マスター鍵を交換・破棄していることを条件とする。"
        "区は、本証明書に記名押印することにより、この条件が満たされていることを表明する。"
    )
    return english, japanese


SHARED_PREFIX = "postgresql:"
"""How a keystore (or a ledger) in PostgreSQL is named: ``postgresql:gateway_keys``."""


def _shared_backup_condition(schema: str, kept: str, kept_ja: str) -> tuple[str, str]:
    """The condition for a keystore that is a schema of the spool's database."""
    english = (
        "Backups of the spool database may exist. Their copies of these records became "
        "unreadable when each record's key epoch was destroyed (epoch_destroyed_at), "
        f"provided the keystore schema {schema} is left out of every backup kept longer "
        f"than {kept} (pg_dump --exclude-schema={schema}, or the keystore kept in a "
        "separate cluster), physical backups of its cluster (base backups, WAL archives, "
        f"which cannot leave a schema out) are deleted within {kept}, and the master key "
        "of any backup taken before key epochs was retired and destroyed. The ward "
        "states that this condition holds by signing this certificate."
    )
    japanese = (
        "スプールのデータベースのバックアップが存在する場合がある。バックアップにあるこれらの"
        "記録の複製は、各記録の鍵エポックが破棄された時点（鍵エポックの破棄日時、"
        "epoch_destroyed_at）で読み取り不能となる。ただし、鍵保管庫のスキーマ "
        f"{schema} を{kept_ja}を超えて保管するバックアップの対象外とすること（pg_dump "
        f"--exclude-schema={schema}、又は鍵保管庫を別のクラスタに置く）、そのクラスタの"
        f"物理バックアップ（ベースバックアップ、WAL アーカイブ。スキーマを除外できない）を"
        f"{kept_ja}以内に削除すること、及び鍵エポック導入前のバックアップのマスター鍵を"
        "交換・破棄していることを条件とする。"
        "区は、本証明書に記名押印することにより、この条件が満たされていることを表明する。"
    )
    return english, japanese


def ledger_location(ledger: ChainLog) -> str:
    """Where the ledger is: its file, or its table in PostgreSQL (never a DSN)."""
    if isinstance(ledger, HashChainLog):
        return str(ledger.path)
    return str(getattr(ledger, "location", type(ledger).__name__))


def certificate(
    ledger: ChainLog,
    start: date,
    end: date,
    *,
    operator: str,
    organization: str,
    now: datetime,
    keystore: str | None = None,
    retention_days: int | None = None,
) -> dict[str, Any]:
    """Verify the ledger and build the certificate for [start, end] (JST dates)."""
    low, high = period_bounds(start, end)
    total, head_seq, head_hash = 0, 0, GENESIS

    def verified() -> Iterable[ChainEntry]:
        """The ledger read once: each entry verified as it comes (ChainBroken names the
        line and the reason), counted, and the last one taken as the head."""
        nonlocal total, head_seq, head_hash
        for entry in ledger.entries():
            total, head_seq, head_hash = total + 1, entry.seq, entry.hash
            yield entry

    records, epochs = select(verified(), low, high)
    pending = sorted({str(r["key_epoch"]) for r in records if r.get("key_epoch")} - set(epochs))
    counts: Counter[tuple[str, str]] = Counter((r["channel"], r["reason"]) for r in records)
    by_channel: dict[str, dict[str, int]] = {}
    for (channel, reason), n in sorted(counts.items()):
        by_channel.setdefault(channel, {})[reason] = n
    methods = sorted({str(r.get("method")) for r in records}) or ["(no erasures)"]
    backup, backup_ja = backup_condition(keystore, retention_days)
    shared = not isinstance(ledger, HashChainLog)  # the shared backend's, in PostgreSQL
    return {
        "title": TITLE,
        "period": {"from": start.isoformat(), "to": end.isoformat(), "timezone": "Asia/Tokyo"},
        "generated_at": now.astimezone(JST).isoformat(timespec="seconds"),
        "ledger": {
            "verified": True,
            "entries": total,
            "head_seq": head_seq,
            "head_hash": head_hash,
            "path": ledger_location(ledger),
        },
        "counts": by_channel,
        "total": len(records),
        "sanitization_record": {  # the fields of NIST SP 800-88's certificate of sanitization
            "person_performing": {
                "name": PERFORMER,
                "reviewed_by": operator,
                "organization": organization,
            },
            "media": {
                "type": MEDIA_TYPE_SHARED if shared else MEDIA_TYPE,
                "source": MEDIA_SOURCE,
                "data_backup": backup,
                "data_backup_ja": backup_ja,
                "key_epochs_pending": pending,
            },
            "sanitization": {
                "method_type": "Purge",
                "method": "Cryptographic Erase",
                "details": methods,
                "tool": f"jp-mynumber-gateway {__version__}",
                "verification": VERIFICATION,
                "post_sanitization_classification": CLASSIFICATION,
                "notes": NOTES_SHARED if shared else NOTES,
            },
            "media_destination": DESTINATION,
        },
        "records": [
            {
                **r,
                "received_at": jst_iso(r.get("received_at")),
                "delivered_at": jst_iso(r.get("delivered_at")),
                "erased_at": jst_iso(r["erased_at"]),
                "key_destroyed_at": jst_iso(r["erased_at"]),
                "key_epoch": r.get("key_epoch"),
                "epoch_destroyed_at": jst_iso(epochs.get(str(r.get("key_epoch")))),
            }
            for r in records
        ],
    }


def counts_text(counts: Mapping[str, Mapping[str, int]]) -> str:
    """The counts by channel and reason, compactly: ``channel/reason=n; ...``."""
    return "; ".join(
        f"{channel}/{reason}={n}"
        for channel, reasons in counts.items()
        for reason, n in reasons.items()
    )


def summary_row(cert: Mapping[str, Any]) -> dict[str, Any]:
    """The certificate's summary, flat: the columns repeated on every CSV row."""
    record = cert["sanitization_record"]
    media, sanitization = record["media"], record["sanitization"]
    ledger = cert["ledger"]
    return {
        "title": cert["title"],
        "period_from": cert["period"]["from"],
        "period_to": cert["period"]["to"],
        "organization": record["person_performing"]["organization"],
        "operator": record["person_performing"]["reviewed_by"],
        "performed_by": record["person_performing"]["name"],
        "generated_at": cert["generated_at"],
        "total": cert["total"],
        "counts": counts_text(cert["counts"]),
        "ledger_verified": "検証済み (verified)" if ledger["verified"] else "",
        "ledger_entries": ledger["entries"],
        "ledger_head_seq": ledger["head_seq"],
        "ledger_head_hash": ledger["head_hash"],
        "method_type": sanitization["method_type"],
        "sanitization_method": sanitization["method"],
        "tool": sanitization["tool"],
        "verification": sanitization["verification"],
        "post_sanitization_classification": sanitization["post_sanitization_classification"],
        "data_backup": media["data_backup"],
        "data_backup_ja": media.get("data_backup_ja", ""),
        "key_epochs_pending": " ".join(media["key_epochs_pending"]),
    }


def as_csv(cert: Mapping[str, Any]) -> bytes:
    """The certificate as one table in UTF-8 with a BOM (Excel reads it as UTF-8): a row
    per record with the summary repeated; a summary-only row when there is no record."""
    out = io.StringIO(newline="")
    writer = csv.writer(out)  # \r\n line ends, as Excel writes them
    writer.writerow(f"{japanese} ({key})" for key, japanese in CSV_COLUMNS.items())
    summary = summary_row(cert)
    rows: list[Mapping[str, Any]] = cert["records"] or [{}]
    for record in rows:
        named = {
            "channel_name": channel_name(record["channel"]) if record.get("channel") else None,
            "reason_name": reason_name(record["reason"]) if record.get("reason") else None,
        }
        values = {**{key: record.get(key) for key in RECORD_COLUMNS}, **named, **summary}
        writer.writerow("" if values.get(key) is None else values[key] for key in CSV_COLUMNS)
    return out.getvalue().encode("utf-8-sig")
