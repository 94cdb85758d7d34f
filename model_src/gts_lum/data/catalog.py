"""The behaviour catalogue of the telecom simulator: every behaviour the synthetic operator records.

Each behaviour is one row of the contract's `behaviors` table (id, text description, type and attribute
columns) and one integer index. The simulator never handles strings per event: it samples indices from
the lookup arrays of `Catalog` (e.g. `ott[app, action, network]`) and strings appear only when a shard
is written, as dictionary-encoded columns.

Descriptions are full sentences so that a sentence encoder groups them by family (streaming, calls,
billing, network problems...) while app, network, country and region names keep them distinct.
The catalogue depends on its size knobs only (not on the simulator seed), so data sets drawn with
different seeds share one behaviour vocabulary.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

# OTT app categories and, per category, (action key, description template) triples.
CATEGORIES = ("video", "short_video", "music", "social", "gaming", "shopping", "news", "navigation")
OTT_ACTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "video": (
        ("film", "Streams a film on {app}"),
        ("sports", "Watches live sports on {app}"),
        ("series", "Binge-watches series episodes on {app}"),
    ),
    "short_video": (
        ("scroll", "Scrolls through short videos on {app}"),
        ("upload", "Uploads a short video to {app}"),
        ("live", "Watches a livestream on {app}"),
    ),
    "music": (
        ("stream", "Streams music on {app}"),
        ("podcast", "Listens to a podcast on {app}"),
        ("download", "Downloads playlists for offline listening on {app}"),
    ),
    "social": (
        ("feed", "Browses the social feed on {app}"),
        ("message", "Sends chat messages on {app}"),
        ("videocall", "Makes a video call on {app}"),
    ),
    "gaming": (
        ("match", "Plays an online multiplayer match in {app}"),
        ("update", "Downloads a game update for {app}"),
        ("spectate", "Streams gameplay from {app}"),
    ),
    "shopping": (
        ("browse", "Browses products on the {app} shopping app"),
        ("order", "Places an order on the {app} shopping app"),
        ("track", "Tracks a parcel delivery on {app}"),
    ),
    "news": (
        ("headlines", "Reads news headlines on {app}"),
        ("clip", "Watches a news video clip on {app}"),
        ("alert", "Opens a breaking-news alert from {app}"),
    ),
    "navigation": (
        ("route", "Navigates a route with {app}"),
        ("traffic", "Checks live traffic on {app}"),
        ("ride", "Books a ride with {app}"),
    ),
}
# Invented app names: stem + suffix per category (unique pairs for up to len(stems) * len(suffixes) apps).
_APP_NAME_PARTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "video": (
        ("Cine", "Flick", "Reel", "Vista", "Lumen", "Screen", "Marquee", "Orbit", "Prism", "Vivid", "Nova", "Aurora"),
        ("Box", "Play", "TV", "Plus", "Now", "Max", "Stream", "Go"),
    ),
    "short_video": (
        ("Clip", "Flash", "Snip", "Zap", "Blink", "Swipe", "Pop", "Jolt", "Bite", "Quick", "Spin", "Dash"),
        ("Tok", "Reels", "Shorts", "Cam", "Vid", "Shot", "Bits", "Moments"),
    ),
    "music": (
        ("Tune", "Melo", "Beat", "Echo", "Rhythm", "Chord", "Sonic", "Groove", "Harmony", "Vinyl", "Lyric", "Tempo"),
        ("ify", "Wave", "Cast", "FM", "Loop", "Radio", "Deck", "Jam"),
    ),
    "social": (
        ("Chat", "Friend", "Circle", "Buzz", "Link", "Moment", "Hive", "Spark", "Town", "Huddle", "Kin", "Nest"),
        ("ly", "Gram", "Feed", "Space", "Book", "Up", "Wall", "Talk"),
    ),
    "gaming": (
        ("Dragon", "Pixel", "Clash", "Legend", "Quest", "Arena", "Battle", "Star", "Rune", "Titan", "Kart", "Squad"),
        (" Saga", " Royale", " Heroes", " Wars", " Rush", " Tactics", " Online", " Legends"),
    ),
    "shopping": (
        ("Shop", "Mall", "Cart", "Deal", "Bazaar", "Market", "Basket", "Bargain", "Outlet", "Trend", "Store", "Bid"),
        ("Go", "Hub", "Mart", "Express", "Club", "Box", "Spot", "Now"),
    ),
    "news": (
        ("Daily", "Herald", "Headline", "Bulletin", "Brief", "Ledger", "Beacon", "Tribune", "Courier", "Gazette", "Globe", "Wire"),
        (" News", " Today", " Digest", " Live", " Report", " Times", " Post", " Express"),
    ),
    "navigation": (
        ("Route", "Way", "Map", "Path", "Trail", "Compass", "Street", "Atlas", "Rider", "Transit", "Metro", "Geo"),
        ("Finder", "Pilot", "Guide", "Mate", "Nav", "Wise", "Scout", "Line"),
    ),
}
# Companion category: where a user often goes next after an app of this category (cross-category link).
COMPANION = {
    "video": "short_video",
    "short_video": "social",
    "music": "navigation",
    "social": "short_video",
    "gaming": "video",
    "shopping": "social",
    "news": "social",
    "navigation": "music",
}
VIDEO_LIKE = ("video", "short_video")
VIDEO_INCIDENTS = (
    ("stall", "Video stalls and buffers on {app}"),
    ("resolution", "Video resolution drops to low definition on {app}"),
    ("failure", "Video playback fails on {app}"),
)

NETWORKS = ("5G", "4G", "Wi-Fi")
NETWORK_PHRASE = ("over 5G", "over 4G", "over Wi-Fi")
TIERS = ("basic", "standard", "premium", "unlimited")
CELL_TYPES = ("urban", "suburban", "rural")
CALL_KINDS = ("local", "long-distance", "international")
CALL_DIRECTIONS = ("Outgoing", "Incoming")
CALL_LENGTHS = ("short (under two minutes)", "long (two minutes or more)")
VOICE_NETWORKS = ("VoNR (5G)", "VoLTE (4G)", "2G/3G fallback")
SMS_KINDS = (
    ("sent", "Sends a text message (SMS)"),
    ("received", "Receives a text message (SMS)"),
    ("intl_sent", "Sends an international text message (SMS)"),
    ("otp", "Receives a one-time verification code by SMS"),
    ("promo", "Receives a promotional SMS from the operator"),
    ("usage_alert", "Receives an SMS alert that 80% of the monthly data is used"),
)
DATA_NETWORKS = ("5G standalone", "4G LTE", "3G")
DATA_SIZES = ("small (under 50 MB)", "medium (50 to 500 MB)", "large (over 500 MB)")
TRANSIT = (
    ("metro", "Passes through underground metro coverage"),
    ("highway", "Hands over between cells along a highway"),
    ("rail", "Connects to cells along a railway line"),
)
ROAMING_KINDS = (
    ("data", "Uses mobile data while roaming in {c}"),
    ("call_out", "Makes a voice call while roaming in {c}"),
    ("call_in", "Receives a voice call while roaming in {c}"),
    ("sms", "Sends an SMS while roaming in {c}"),
    ("register", "Registers on a partner network in {c}"),
    ("welcome", "Receives the roaming welcome SMS on arrival in {c}"),
    ("pass", "Buys a roaming data pass for {c}"),
)
DAILY_DATA_BANDS = ("light (under 500 MB)", "moderate (500 MB to 2 GB)", "heavy (2 to 5 GB)", "very heavy (over 5 GB)")
DAILY_DATA_EDGES_MB = (500.0, 2000.0, 5000.0)
DAILY_VOICE_BANDS = ("under 10 minutes", "10 to 60 minutes", "over an hour")
DAILY_VOICE_EDGES_MIN = (10.0, 60.0)
PAY_CHANNELS = ("autopay", "the operator app", "online banking", "a retail store")
TOPUP_AMOUNTS = (10, 30, 50, 100)
TOPUP_CHANNELS = ("the operator app", "a bank card", "a retail store", "a scratch voucher")
ADDON_SIZES = ("1 GB", "5 GB", "20 GB")
CARE_CHANNELS = ("the hotline", "in-app chat", "a retail store", "social media")
COMPLAINT_TOPICS = ("video streaming quality", "dropped calls", "slow mobile data", "a billing error", "poor indoor coverage")
INQUIRY_TOPICS = ("the monthly bill", "plan options", "roaming charges", "a new device", "the remaining data balance")
REGIONS = (
    "Metro Central",
    "Riverside",
    "Harbourfront",
    "Eastgate",
    "Westfield",
    "Northern Hills",
    "Southern Plains",
    "Lakeside",
    "Valley",
    "Coastline",
    "Highlands",
    "Orchard County",
)
COUNTRIES = (
    "Japan",
    "Thailand",
    "Singapore",
    "South Korea",
    "Malaysia",
    "Vietnam",
    "Australia",
    "the United States",
    "the United Kingdom",
    "France",
    "Germany",
    "the United Arab Emirates",
    "Indonesia",
    "Italy",
    "Canada",
    "New Zealand",
)
# Incident kinds (why a complaint is made); 0 = not an incident.
INCIDENT_NONE, INCIDENT_VIDEO, INCIDENT_CALL, INCIDENT_DATA = 0, 1, 2, 3
COMPLAINT_TOPIC_OF_INCIDENT = {INCIDENT_VIDEO: 0, INCIDENT_CALL: 1, INCIDENT_DATA: 2}

BEHAVIOR_COLUMNS = (
    "behavior_id",
    "description",
    "type",
    "family",
    "granularity",
    "source",
    "value_unit",
    "app",
    "app_category",
    "network",
    "country",
    "region",
)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_").replace("__", "_")


def app_names(num_apps: int) -> tuple[np.ndarray, np.ndarray]:
    """(A,) invented app names and (A,) category index; apps are dealt round-robin over the categories."""
    category = np.arange(num_apps) % len(CATEGORIES)
    names = []
    for a in range(num_apps):
        stems, suffixes = _APP_NAME_PARTS[CATEGORIES[category[a]]]
        k = a // len(CATEGORIES)  # k-th app of its category
        # stem cycles fastest; the suffix shifts with the stem so that neighbours do not share it
        names.append(stems[k % len(stems)] + suffixes[(k // len(stems) + 3 * (k % len(stems))) % len(suffixes)])
    if len(set(names)) != num_apps:
        raise ValueError(f"num_apps={num_apps}: app names are no longer unique; at most {len(CATEGORIES) * 96} apps are supported")
    return np.array(names, dtype=object), category


class _Rows:
    """Accumulates behaviour rows; `grid` adds one row per combination of axes and returns their indices."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.source: list[str] = []

    def add(
        self,
        behavior_id: str,
        description: str,
        type: str,
        family: str,
        source: str,
        granularity: str = "second",
        value_unit: str | None = None,
        **attributes,
    ) -> int:
        self.rows.append(
            dict(
                behavior_id=behavior_id,
                description=description,
                type=type,
                family=family,
                granularity=granularity,
                source=source,
                value_unit=value_unit,
                **attributes,
            )
        )
        return len(self.rows) - 1

    def grid(self, axes: tuple[int, ...], make) -> np.ndarray:
        """`make(*index)` -> kwargs of `add` for every index of an array of shape `axes`."""
        out = np.empty(axes, dtype=np.int32)
        for index in itertools.product(*(range(n) for n in axes)):
            out[index] = self.add(**make(*index))
        return out

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows, columns=list(BEHAVIOR_COLUMNS))
        if frame["behavior_id"].duplicated().any():
            raise AssertionError(f"duplicate behaviour ids: {frame['behavior_id'][frame['behavior_id'].duplicated()].tolist()[:5]}")
        return frame


@dataclass
class Catalog:
    """Behaviour rows plus integer lookup tables (entries are row indices of `table`; -1 where undefined)."""

    table: pd.DataFrame  # the contract's behaviors table, row i = behaviour index i
    app_name: np.ndarray  # (A,) str
    app_category: np.ndarray  # (A,) int index into CATEGORIES
    ott: np.ndarray  # (A, 3 actions, 3 networks)
    video_incident: np.ndarray  # (A, 3): stall, resolution drop, playback failure; -1 for non-video apps
    gaming_lag: np.ndarray  # (A,) lag spike; -1 for non-gaming apps
    app_addon: np.ndarray  # (A,) streaming add-on subscription; -1 for apps without one
    voice: np.ndarray  # (3 kinds, 2 directions, 2 lengths, 3 voice networks)
    call_drop: np.ndarray  # (3 kinds)
    redial: int
    call_setup_failure: int
    sms: np.ndarray  # (len(SMS_KINDS),)
    data: np.ndarray  # (3 networks, 3 sizes)
    tethering: np.ndarray  # (2 networks: 5G, 4G)
    slow_data: np.ndarray  # (3 cell types)
    data_lost: int
    location: np.ndarray  # (R regions, 3 cell types, 2 networks: 5G, 4G)
    transit: np.ndarray  # (len(TRANSIT),)
    roaming: np.ndarray  # (K countries, len(ROAMING_KINDS))
    daily_data: np.ndarray  # (4 bands)
    daily_voice: np.ndarray  # (3 bands)
    bill: np.ndarray  # (4 tiers) postpaid monthly bill
    renewal: np.ndarray  # (4 tiers) prepaid monthly renewal
    bill_paid: np.ndarray  # (4 channels)
    overdue: int
    topup: np.ndarray  # (4 amounts, 4 channels)
    upgrade: np.ndarray  # (4 tiers) from tier t to t+1; -1 for the top tier
    downgrade: np.ndarray  # (4 tiers) from tier t to t-1; -1 for the bottom tier
    data_addon: np.ndarray  # (3 sizes)
    intl_pack: int
    complaint: np.ndarray  # (5 topics, 4 channels)
    inquiry: np.ndarray  # (5 topics, 4 channels)
    incident_kind: np.ndarray  # (B,) int8 INCIDENT_* per behaviour
    source: np.ndarray  # (B,) int index into `sources`
    sources: np.ndarray  # (S,) str

    @property
    def num_behaviors(self) -> int:
        return len(self.table)

    @property
    def num_apps(self) -> int:
        return len(self.app_name)

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(REGIONS[: self.location.shape[0]])

    @property
    def country_names(self) -> tuple[str, ...]:
        return tuple(COUNTRIES[: self.roaming.shape[0]])


def _app_rows(rows: _Rows, names: np.ndarray, category: np.ndarray) -> dict:
    """OTT sessions (app x action x network) and the per-app extras some categories have.

    Each `_*_rows` adds one family of rows and returns its lookup tables (fields of `Catalog`)."""
    A = len(names)

    def app_row(a: int, key: str, text: str, type: str, family: str, source: str, unit: str | None, network: str | None = None):
        cat = CATEGORIES[category[a]]
        net_id = f".{_slug(network)}" if network else ""
        return dict(
            behavior_id=f"{type}.{cat}.{_slug(names[a])}.{key}{net_id}",
            description=text,
            type=type,
            family=family,
            source=source,
            value_unit=unit,
            app=names[a],
            app_category=cat,
            network=network,
        )

    def ott_row(a, k, n):
        key, template = OTT_ACTIONS[CATEGORIES[category[a]]][k]
        return app_row(
            a,
            key,
            f"{template.format(app=names[a])} {NETWORK_PHRASE[n]}",
            "ott",
            f"ott_{CATEGORIES[category[a]]}",
            "xdr",
            "MB",
            NETWORKS[n],
        )

    ott = rows.grid((A, 3, 3), ott_row)
    video_incident = np.full((A, len(VIDEO_INCIDENTS)), -1, np.int32)
    gaming_lag = np.full(A, -1, np.int32)
    app_addon = np.full(A, -1, np.int32)
    for a in range(A):  # per-app extras exist only for some categories
        cat = CATEGORIES[category[a]]
        if cat in VIDEO_LIKE:
            for j, (key, template) in enumerate(VIDEO_INCIDENTS):
                video_incident[a, j] = rows.add(
                    **app_row(a, key, template.format(app=names[a]), "incident", "incident_video", "qoe_probe", None)
                )
        if cat == "gaming":
            gaming_lag[a] = rows.add(
                **app_row(a, "lag", f"Lag spike during an online match in {names[a]}", "incident", "incident_gaming", "qoe_probe", "ms")
            )
        if cat in VIDEO_LIKE + ("music",):
            app_addon[a] = rows.add(
                **app_row(a, "addon", f"Subscribes to the {names[a]} streaming add-on bundle", "plan", "plan_addon", "bss", "currency")
            )
    return dict(ott=ott, video_incident=video_incident, gaming_lag=gaming_lag, app_addon=app_addon)


def _voice_and_sms_rows(rows: _Rows) -> dict:
    """Voice calls (kind x direction x length x voice network), call incidents and the redial, SMS."""

    def voice_row(k, d, length, n):
        kind = CALL_KINDS[k]
        return dict(
            behavior_id=f"voice.{_slug(kind)}.{CALL_DIRECTIONS[d].lower()}.{'short' if length == 0 else 'long'}.{_slug(VOICE_NETWORKS[n])}",
            description=f"{CALL_DIRECTIONS[d]} {kind} voice call, {CALL_LENGTHS[length]}, over {VOICE_NETWORKS[n]}",
            type="voice",
            family=f"voice_{_slug(kind)}",
            source="cdr",
            value_unit="seconds",
            network=VOICE_NETWORKS[n],
        )

    voice = rows.grid((3, 2, 2, 3), voice_row)
    call_drop = rows.grid(
        (3,),
        lambda k: dict(
            behavior_id=f"incident.call_drop.{_slug(CALL_KINDS[k])}",
            description=f"Call drops in the middle of a {CALL_KINDS[k]} voice call",
            type="incident",
            family="incident_call",
            source="cdr",
        ),
    )
    redial = rows.add(
        "voice.redial", "Redials the same number right after a dropped call", "voice", "voice_redial", "cdr", value_unit="seconds"
    )
    call_setup_failure = rows.add(
        "incident.call_setup_failure", "Outgoing call fails to connect (call setup failure)", "incident", "incident_call", "cdr"
    )
    sms = rows.grid(
        (len(SMS_KINDS),),
        lambda k: dict(behavior_id=f"sms.{SMS_KINDS[k][0]}", description=SMS_KINDS[k][1], type="sms", family="sms", source="cdr"),
    )
    return dict(voice=voice, call_drop=call_drop, redial=redial, call_setup_failure=call_setup_failure, sms=sms)


def _data_rows(rows: _Rows) -> dict:
    """Mobile data sessions (network x size), tethering and data incidents."""
    data = rows.grid(
        (3, 3),
        lambda n, s: dict(
            behavior_id=f"data.{_slug(DATA_NETWORKS[n])}.{('small', 'medium', 'large')[s]}",
            description=f"Mobile data session over {DATA_NETWORKS[n]}, {DATA_SIZES[s]}",
            type="data",
            family="data_session",
            source="xdr",
            value_unit="MB",
            network=DATA_NETWORKS[n],
        ),
    )
    tethering = rows.grid(
        (2,),
        lambda n: dict(
            behavior_id=f"data.tethering.{_slug(NETWORKS[n])}",
            description=f"Shares mobile data through a personal hotspot over {NETWORKS[n]}",
            type="data",
            family="data_tethering",
            source="xdr",
            value_unit="MB",
            network=NETWORKS[n],
        ),
    )
    slow_data = rows.grid(
        (3,),
        lambda c: dict(
            behavior_id=f"incident.slow_data.{CELL_TYPES[c]}",
            description=f"Mobile data is very slow (below 1 Mbps) in a {CELL_TYPES[c]} cell",
            type="incident",
            family="incident_data",
            source="qoe_probe",
        ),
    )
    data_lost = rows.add(
        "incident.data_lost", "Mobile data connection is lost and re-established", "incident", "incident_data", "signalling"
    )
    return dict(data=data, tethering=tethering, slow_data=slow_data, data_lost=data_lost)


def _location_rows(rows: _Rows, num_regions: int, num_countries: int) -> dict:
    """Location updates at home, transit and roaming abroad."""
    location = rows.grid(
        (num_regions, 3, 2),
        lambda r, c, n: dict(
            behavior_id=f"location.{_slug(REGIONS[r])}.{CELL_TYPES[c]}.{_slug(NETWORKS[n])}",
            description=f"Location update: registers on a {CELL_TYPES[c]} {NETWORKS[n]} cell in {REGIONS[r]}",
            type="location",
            family="location_update",
            source="signalling",
            network=NETWORKS[n],
            region=REGIONS[r],
        ),
    )
    transit = rows.grid(
        (len(TRANSIT),),
        lambda k: dict(
            behavior_id=f"location.transit.{TRANSIT[k][0]}",
            description=TRANSIT[k][1],
            type="location",
            family="location_transit",
            source="signalling",
        ),
    )
    roaming = rows.grid(
        (num_countries, len(ROAMING_KINDS)),
        lambda c, k: dict(
            behavior_id=f"roaming.{_slug(COUNTRIES[c])}.{ROAMING_KINDS[k][0]}",
            description=ROAMING_KINDS[k][1].format(c=COUNTRIES[c]),
            type="roaming",
            family=f"roaming_{ROAMING_KINDS[k][0]}",
            source="roaming_tap",
            value_unit={"data": "MB", "call_out": "seconds", "call_in": "seconds", "pass": "currency"}.get(ROAMING_KINDS[k][0]),
            country=COUNTRIES[c].removeprefix("the "),
        ),
    )
    return dict(location=location, transit=transit, roaming=roaming)


def _usage_rows(rows: _Rows) -> dict:
    """Daily usage summaries (data and voice bands)."""
    daily_data = rows.grid(
        (4,),
        lambda b: dict(
            behavior_id=f"usage.daily_data.{_slug(DAILY_DATA_BANDS[b].split(' (')[0])}",
            description=f"Daily mobile data usage record: {DAILY_DATA_BANDS[b]}",
            type="usage",
            family="usage_daily",
            source="usage_summary",
            granularity="day",
            value_unit="MB",
        ),
    )
    daily_voice = rows.grid(
        (3,),
        lambda b: dict(
            behavior_id=f"usage.daily_voice.{b}",
            description=f"Daily voice usage record: {DAILY_VOICE_BANDS[b]} of calls",
            type="usage",
            family="usage_daily",
            source="usage_summary",
            granularity="day",
            value_unit="minutes",
        ),
    )
    return dict(daily_data=daily_data, daily_voice=daily_voice)


def _billing_rows(rows: _Rows) -> dict:
    """Bills, prepaid renewals, payments and top-ups."""
    bill = rows.grid(
        (4,),
        lambda t: dict(
            behavior_id=f"billing.bill.{TIERS[t]}",
            description=f"Monthly postpaid bill issued for the {TIERS[t]} plan",
            type="billing",
            family="billing_bill",
            source="billing",
            granularity="month",
            value_unit="currency",
        ),
    )
    renewal = rows.grid(
        (4,),
        lambda t: dict(
            behavior_id=f"billing.prepaid_renewal.{TIERS[t]}",
            description=f"Prepaid {TIERS[t]} package renews for the month",
            type="billing",
            family="billing_renewal",
            source="billing",
            granularity="month",
            value_unit="currency",
        ),
    )
    bill_paid = rows.grid(
        (4,),
        lambda c: dict(
            behavior_id=f"billing.payment.{_slug(PAY_CHANNELS[c])}",
            description=f"Pays the monthly bill through {PAY_CHANNELS[c]}",
            type="billing",
            family="billing_payment",
            source="billing",
            value_unit="currency",
        ),
    )
    overdue = rows.add(
        "billing.overdue_reminder", "Receives a reminder that the monthly bill is overdue", "billing", "billing_overdue", "billing"
    )
    topup = rows.grid(
        (4, 4),
        lambda m, c: dict(
            behavior_id=f"topup.{TOPUP_AMOUNTS[m]}.{_slug(TOPUP_CHANNELS[c])}",
            description=f"Tops up the prepaid balance with {TOPUP_AMOUNTS[m]} through {TOPUP_CHANNELS[c]}",
            type="topup",
            family="topup",
            source="billing",
            value_unit="currency",
        ),
    )
    return dict(bill=bill, renewal=renewal, bill_paid=bill_paid, overdue=overdue, topup=topup)


def _plan_and_care_rows(rows: _Rows) -> dict:
    """Plan changes and add-ons, customer-care complaints and inquiries."""
    upgrade = np.full(4, -1, np.int32)
    downgrade = np.full(4, -1, np.int32)
    for t in range(3):
        upgrade[t] = rows.add(
            f"plan.upgrade.{TIERS[t]}_to_{TIERS[t + 1]}",
            f"Upgrades the plan from {TIERS[t]} to {TIERS[t + 1]}",
            "plan",
            "plan_upgrade",
            "bss",
        )
        downgrade[t + 1] = rows.add(
            f"plan.downgrade.{TIERS[t + 1]}_to_{TIERS[t]}",
            f"Downgrades the plan from {TIERS[t + 1]} to {TIERS[t]}",
            "plan",
            "plan_downgrade",
            "bss",
        )
    data_addon = rows.grid(
        (3,),
        lambda s: dict(
            behavior_id=f"plan.data_addon.{_slug(ADDON_SIZES[s])}",
            description=f"Buys a {ADDON_SIZES[s]} mobile data add-on",
            type="plan",
            family="plan_addon",
            source="bss",
            value_unit="currency",
        ),
    )
    intl_pack = rows.add(
        "plan.intl_calling_pack", "Adds an international calling pack to the plan", "plan", "plan_addon", "bss", value_unit="currency"
    )
    complaint = rows.grid(
        (len(COMPLAINT_TOPICS), 4),
        lambda t, c: dict(
            behavior_id=f"care.complaint.{_slug(COMPLAINT_TOPICS[t])}.{_slug(CARE_CHANNELS[c])}",
            description=f"Complains to customer care about {COMPLAINT_TOPICS[t]} through {CARE_CHANNELS[c]}",
            type="care",
            family="care_complaint",
            source="crm",
        ),
    )
    inquiry = rows.grid(
        (len(INQUIRY_TOPICS), 4),
        lambda t, c: dict(
            behavior_id=f"care.inquiry.{_slug(INQUIRY_TOPICS[t])}.{_slug(CARE_CHANNELS[c])}",
            description=f"Asks customer care about {INQUIRY_TOPICS[t]} through {CARE_CHANNELS[c]}",
            type="care",
            family="care_inquiry",
            source="crm",
        ),
    )
    return dict(upgrade=upgrade, downgrade=downgrade, data_addon=data_addon, intl_pack=intl_pack, complaint=complaint, inquiry=inquiry)


def build_catalog(num_apps: int = 96, num_regions: int = 8, num_countries: int = 12) -> Catalog:
    """The behaviour catalogue for `num_apps` OTT apps, `num_regions` home regions and `num_countries` roaming destinations."""
    if num_apps < len(CATEGORIES):
        raise ValueError(f"num_apps={num_apps}: need at least one app per category ({len(CATEGORIES)})")
    if not 1 <= num_regions <= len(REGIONS):
        raise ValueError(f"num_regions={num_regions}: must lie in [1, {len(REGIONS)}]")
    if not 1 <= num_countries <= len(COUNTRIES):
        raise ValueError(f"num_countries={num_countries}: must lie in [1, {len(COUNTRIES)}]")
    names, category = app_names(num_apps)
    rows = _Rows()
    # row order is behaviour index order: the families are added in this order
    lookups = _app_rows(rows, names, category)
    lookups |= _voice_and_sms_rows(rows)
    lookups |= _data_rows(rows)
    lookups |= _location_rows(rows, num_regions, num_countries)
    lookups |= _usage_rows(rows)
    lookups |= _billing_rows(rows)
    lookups |= _plan_and_care_rows(rows)

    table = rows.frame()
    incident_kind = np.zeros(len(table), np.int8)
    family = table["family"].to_numpy()
    incident_kind[np.isin(family, ["incident_video", "incident_gaming"])] = INCIDENT_VIDEO
    incident_kind[family == "incident_call"] = INCIDENT_CALL
    incident_kind[family == "incident_data"] = INCIDENT_DATA
    source_codes, sources = pd.factorize(table["source"], sort=True)
    return Catalog(
        table=table,
        app_name=names,
        app_category=category,
        **lookups,
        incident_kind=incident_kind,
        source=source_codes.astype(np.int32),
        sources=np.asarray(sources, dtype=object),
    )
