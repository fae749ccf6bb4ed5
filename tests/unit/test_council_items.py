"""Every channel carries exactly the items its council paper approved, and no more.

Each list below is written out by hand from the paper's own item list (処理させる情報項目
/ 結合される情報項目 / 記録項目), with the paper's Japanese item name beside each field.
None of it is derived from the configuration: the shipped ``conf/gateway.toml`` is held
against these lists, so a field added to a channel without the council's approval fails
here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config

SHIPPED = Path(__file__).resolve().parents[2] / "conf" / "gateway.toml"

PINS = {
    # 暗証番号: the four PINs of the card
    "pin_signature_cert": "署名用電子証明書暗証番号",
    "pin_user_cert": "利用者証明用電子証明書暗証番号",
    "pin_resident_registry": "住民基本台帳用暗証番号",
    "pin_card_info_input": "券面事項入力補助用暗証番号",
}

# 資料36 (マイナンバーカードオンライン申請補助端末の導入等): 結合される情報項目
# 申請情報（申請書ID、顔写真、電子証明書希望有無、点字希望有無）
# システム上の対策 10: 氏名、住所、生年月日等の項目は送信しない。
ONLINE_APPLICATION = {
    "application_id": "申請書ID",
    "face_photo": "顔写真",
    "wants_e_certificate": "電子証明書希望有無",
    "wants_braille": "点字希望有無",
}

# 資料40 (マイナンバーカード特急発行に係る外部結合等): 結合される情報項目
# 申請情報（氏名、生年月日、性別、住所、申請書ＩＤ、顔写真、電子証明書希望有無、
# 点字希望有無、暗証番号）. The flow (資料40-1 ⑤) says 氏名、生年月日、性別、住所は
# 送信しない: the tablet records them, they are not sent. The stricter reading holds.
EXPRESS_ISSUANCE = {
    "application_id": "申請書ＩＤ",
    "face_photo": "顔写真",
    "wants_e_certificate": "電子証明書希望有無",
    "wants_braille": "点字希望有無",
    **PINS,
}
EXPRESS_RECORDED_NOT_SENT = {
    "name": "氏名",
    "birth_date": "生年月日",
    "sex": "性別",
    "address": "住所",
}

# 資料14 (国外転出者向けマイナンバーカードに係るオンライン申請受付): 結合される情報項目
# 申請情報（申請書ID、顔写真、電子証明書希望有無、点字希望有無、氏名（振り仮名を含む）、
# 生年月日、性別、本籍、暗証番号）
OVERSEAS_APPLICATION = {
    "application_id": "申請書ID",
    "face_photo": "顔写真",
    "wants_e_certificate": "電子証明書希望有無",
    "wants_braille": "点字希望有無",
    "name": "氏名",
    "name_kana": "氏名（振り仮名）",
    "birth_date": "生年月日",
    "sex": "性別",
    "registered_domicile": "本籍",
    **PINS,
}

# 資料30 (個人番号通知書・個人番号カード関連事務の委任): 情報項目は資料30－２のとおり.
# That list is not among the papers: the gateway carries the already-encrypted file
# opaquely, with the manifest it needs to check it arrived whole.
CARD_DELEGATION_BATCH = {
    "batch_file": "委任データファイル（暗号化済み、内容は資料30－２）",
    "batch_id": "バッチID",
    "record_count": "件数",
    "sha256": "SHA-256",
}

# 資料60 (マイナンバーカードの交付に係る予約受付等業務の委託): 処理させる情報項目
# 【マイナンバーカード予約電話受付業務において処理される情報項目】 19 items
ISSUANCE_RESERVATION = {
    "name": "氏名",
    "alias_name": "通称",
    "birth_date": "生年月日",
    "address": "住所",
    "phone": "連絡先（電話番号）",
    "foreign_resident_category": "外国人住民の区分",
    "residence_period_expiry": "在留期間等満了日",
    "application_id": "申請書ＩＤ",
    "manufacture_control_number": "製造管理番号",
    "shipment_number": "発送番号",
    "reservation_number": "予約番号",
    "email": "電子メールアドレス",
    "recipient_type": "受取人種別",
    "proxy_name": "代理受取人氏名",
    "reservation_datetime": "交付予約日時",
    "issuance_window": "交付窓口",
    "reception_number": "受付番号",
    "processing_status": "処理状況",
    "card_expiry_date": "有効期限",
}

# 資料60: 【マイナンバーカード交付窓口受付業務において処理される情報項目】 13 items
WINDOW_RECEPTION = {
    "name": "氏名",
    "alias_name": "通称",
    "birth_date": "生年月日",
    "address": "住所",
    "manufacture_control_number": "製造管理番号",
    "shipment_number": "発送番号",
    "reservation_number": "予約番号",
    "recipient_type": "受取人種別",
    "proxy_name": "代理受取人氏名",
    "reservation_datetime": "交付予約日時",
    "issuance_window": "交付窓口",
    "reception_number": "受付番号",
    "individual_number": "個人番号",
}

PAPERS: dict[str, dict[str, str]] = {
    "online-application": ONLINE_APPLICATION,
    "express-issuance": EXPRESS_ISSUANCE,
    "overseas-application": OVERSEAS_APPLICATION,
    "card-delegation-batch": CARD_DELEGATION_BATCH,
    "issuance-reservation": ISSUANCE_RESERVATION,
    "window-reception": WINDOW_RECEPTION,
}
SEED_ITEM_NAMES_VERBATIM = {"issuance-reservation", "window-reception"}
"""Channels whose configured labels are the paper's own item names, one to one."""


def test_the_paper_lists_have_the_papers_counts() -> None:
    """資料60 names 19 reservation items and 13 window items; 資料36 four; 資料14 nine
    items, of which 氏名 covers name and kana and 暗証番号 the four PINs."""
    assert len(ISSUANCE_RESERVATION) == 19
    assert len(WINDOW_RECEPTION) == 13
    assert len(ONLINE_APPLICATION) == 4
    assert len(OVERSEAS_APPLICATION) == 9 + 1 + 3


def test_the_shipped_file_has_exactly_the_six_approved_channels() -> None:
    """One channel per approved flow, and none that the council did not approve."""
    assert set(load_config(SHIPPED).channels) == set(PAPERS)


@pytest.mark.parametrize("channel", sorted(PAPERS))
def test_each_channel_lets_through_exactly_the_papers_items(channel: str) -> None:
    """The shipped channel's fields are the paper's items: nothing missing, nothing more."""
    fields = set(load_config(SHIPPED).channels[channel].fields)
    assert fields == set(PAPERS[channel]), (
        f"not in the paper: {sorted(fields - set(PAPERS[channel]))}; "
        f"missing: {sorted(set(PAPERS[channel]) - fields)}"
    )


@pytest.mark.parametrize("channel", sorted(SEED_ITEM_NAMES_VERBATIM))
def test_office_channels_label_each_field_with_the_papers_item_name(channel: str) -> None:
    """資料60's channels carry the paper's own Japanese item name as each field's label."""
    fields = load_config(SHIPPED).channels[channel].fields
    assert {name: rule.label for name, rule in fields.items()} == PAPERS[channel]


def test_window_reception_carries_none_of_the_reservation_only_items() -> None:
    """The window channel has no application id, phone, e-mail, foreign-resident
    category, residence expiry, processing status or card expiry: 資料60 does not list
    them for 交付窓口受付業務."""
    fields = set(load_config(SHIPPED).channels["window-reception"].fields)
    reservation_only = {
        "application_id",
        "phone",
        "email",
        "foreign_resident_category",
        "residence_period_expiry",
        "processing_status",
        "card_expiry_date",
    }
    assert fields.isdisjoint(reservation_only)
    assert set(ISSUANCE_RESERVATION) - set(WINDOW_RECEPTION) == reservation_only
    assert set(WINDOW_RECEPTION) - set(ISSUANCE_RESERVATION) == {"individual_number"}


def test_express_issuance_sends_none_of_what_the_tablet_only_records() -> None:
    """資料40-1: 氏名、生年月日、性別、住所は送信しない."""
    fields = set(load_config(SHIPPED).channels["express-issuance"].fields)
    assert fields.isdisjoint(EXPRESS_RECORDED_NOT_SENT)


def test_online_application_never_carries_name_address_or_birth_date() -> None:
    """資料36 システム上の対策 10: 氏名、住所、生年月日等の項目は送信しない."""
    fields = set(load_config(SHIPPED).channels["online-application"].fields)
    assert fields.isdisjoint({"name", "address", "birth_date", "name_kana", "sex"})


def test_the_individual_number_travels_on_the_window_channel_only() -> None:
    """個人番号 is an item of 交付窓口受付業務 alone among the six flows."""
    config = load_config(SHIPPED)
    carrying = {n for n, c in config.channels.items() if "individual_number" in c.fields}
    assert carrying == {"window-reception"}
