"""A synthetic telecom operator: users, behaviours, events, labels and scenarios in the data contract.

The simulator exists so that every component of GTS-LUM has something real to find in open data:

- periodicity: user archetypes (commuter, student, night worker...) with weekday/weekend hourly
  profiles in the operator's timezone; OTT categories with their own hours (news at breakfast,
  navigation at rush hour, gaming late at night);
- several time granularities: per-second sessions and location updates, daily usage records at local
  midnight, monthly bills on the first of the month (`granularity` column of the behaviours);
- co-occurrence inside one 15-minute interval: stall -> resolution drop -> playback failure, call drop
  -> redial, top-up -> data session, online order -> SMS code;
- sequential and personal OTT preferences: each user has favourite apps; an app session is often
  followed by the same app or a related one (a Markov signal) but user taste and the hour matter more;
- attributes that matter: 4G devices and rural cells see more incidents, heavy plans stream more;
- long-term experience: a hidden, slowly varying network quality per user (weekly AR(1) plus outage
  weeks) drives incidents, and the incidents accumulated over the whole window drive complaints,
  downgrades and churn, so labels depend on history, not only on the users table;
- a randomized campaign (upgrade offer) whose effect differs by usage, device and incident history.

Generation is vectorized per shard of users: counts of episodes per user-day, start times by
inverse-CDF over hourly profiles, categorical choices by flattened cumulative sums + searchsorted
(`CategoricalRows`); Python loops run over episode types, chain steps and days of the calendar only.
Every shard has its own random stream, so output is byte-identical for a given config.

Labels (`churn`, `upgrade`, `downgrade`, `campaign_response`) describe the `label_horizon_days` after
the observation window; their `time` is the end of the window (the prediction time: only events
before it may be used, and all events lie before it).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from gts_lum.config import load_config
from gts_lum.data import catalog as cat
from gts_lum.data.catalog import Catalog, build_catalog
from gts_lum.data.contract import DatasetManifest
from gts_lum.data.events import ragged_arange

log = logging.getLogger(__name__)

DAY = 86_400
HOUR = 3_600


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@dataclass
class CampaignConfig:
    """A plan-upgrade offer sent at the end of the window to a random `treatment_fraction` of eligible users.

    Effects are shifts of the response logit for treated users: the offer works for heavy users on capped
    plans and for 5G devices on low tiers, and backfires for users with an incident-laden history.
    """

    treatment_fraction: float = 0.5
    base_effect: float = 0.3
    heavy_user_effect: float = 1.2  # times the share of days over the plan's data allowance / 0.3 (capped at 1)
    device_effect: float = 0.6  # 5G device on a basic or standard plan
    incident_effect: float = -1.6  # times the incident load (incidents a week / 10, capped at 1)


@dataclass
class SimulatorConfig:
    """What data set to draw; the generative settings below (archetypes, hazards...) are fixed constants.

    Packaged configs: `pkg:synth/tiny.yaml` (tests), `pkg:synth/demo.yaml` (the main pipeline's data),
    `pkg:synth/bench.yaml` (10k users x 90 days, the speed benchmark).
    """

    name: str = "synthetic-telco"
    users: int = 2_000
    days: int = 60
    start_date: str = "2024-03-04"  # local date of the first day (a Monday)
    timezone: str = "Asia/Shanghai"  # operator timezone: hours, weekdays, midnights and month starts are local
    events_per_user_per_day: float = 50.0  # average volume (the paper's data has about 50)
    num_apps: int = 96  # OTT apps, dealt over 8 categories; the catalogue grows ~9 behaviours per app
    num_regions: int = 8
    num_countries: int = 12  # roaming destinations
    users_per_shard: int = 1_000  # one events/part-NNNNN.parquet per shard; ~1 GB peak at 90 days, arrays the allocator reuses
    label_horizon_days: int = 30  # labels describe this many days after the window
    scenarios_per_user_per_week: float = 1.0
    seed: int = 0
    campaign: CampaignConfig = field(default_factory=CampaignConfig)

    def validate(self) -> None:
        checks = {
            "users": self.users >= 1,
            "days": 1 <= self.days <= 10_000,  # seconds into the window fill 30 bits of the sort key
            "events_per_user_per_day": self.events_per_user_per_day > 0,
            "users_per_shard": 1 <= self.users_per_shard < 2**20,
            "label_horizon_days": self.label_horizon_days >= 1,
            "scenarios_per_user_per_week": self.scenarios_per_user_per_week >= 0,
            "campaign.treatment_fraction": 0.0 < self.campaign.treatment_fraction < 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"SimulatorConfig.{name}={_get(self, name)!r} is out of range")
        try:
            date.fromisoformat(self.start_date)
        except ValueError as exc:
            raise ValueError(f"SimulatorConfig.start_date={self.start_date!r}: expected YYYY-MM-DD") from exc
        try:
            ZoneInfo(self.timezone)
        except Exception as exc:  # ZoneInfoNotFoundError or a malformed key
            raise ValueError(f"SimulatorConfig.timezone={self.timezone!r}: not an IANA timezone name") from exc


def _get(obj, dotted: str):
    for key in dotted.split("."):
        obj = getattr(obj, key)
    return obj


# ----------------------------------------------------------------------------------------------------
# Generative settings (frozen: changing them changes every data set drawn from a seed)
# ----------------------------------------------------------------------------------------------------

EPISODES = ("ott", "voice", "sms", "data", "move", "topup", "inquiry")
C_VIDEO, C_GAMING, C_SHOPPING = (cat.CATEGORIES.index(c) for c in ("video", "gaming", "shopping"))
E_OTT, E_VOICE, E_SMS, E_DATA, E_MOVE, E_TOPUP, E_INQUIRY = range(len(EPISODES))
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
BRANDS = ("Apple", "Huawei", "Xiaomi", "Samsung", "OPPO", "vivo", "Honor")
BRAND_SHARE = (0.22, 0.2, 0.18, 0.12, 0.1, 0.1, 0.08)
BRAND_OS = ("iOS", "HarmonyOS", "Android", "Android", "Android", "Android", "HarmonyOS")
RUSH_HOURS = (7, 8, 9, 17, 18, 19)  # local hours of the morning and evening rush
TIER_FEE = np.array([29.0, 59.0, 99.0, 159.0])
TIER_ALLOWANCE_MB_DAY = np.array([10_000.0, 30_000.0, 80_000.0, np.inf]) / 30.0
TIER_STREAMING = np.array([0.6, 1.0, 1.4, 1.8])  # video appetite by plan tier
TIER_5G = np.array([0.35, 0.55, 0.75, 0.9])  # chance of a 5G device by plan tier
CELL_5G_COVERAGE = np.array([0.9, 0.65, 0.3])  # chance a 5G device is on 5G, by home cell type
CELL_QUALITY = np.array([1.0, 1.4, 2.2])  # incident multiplier by home cell type
CELL_FALLBACK = np.array([0.02, 0.05, 0.15])  # 2G/3G fallback (voice) or 3G (data) by home cell type


@dataclass(frozen=True)
class Archetype:
    name: str
    share: float
    weekday_hours: tuple[tuple[float, float, float], ...]  # (peak hour, width in hours, weight) bumps
    weekend_hours: tuple[tuple[float, float, float], ...]
    weekend_volume: float  # a weekend day's volume relative to a weekday's
    activity: float  # volume relative to the average user
    episodes: tuple[float, ...]  # mix over EPISODES
    categories: tuple[float, ...]  # OTT taste over catalog.CATEGORIES
    prepaid: float
    tiers: tuple[float, float, float, float]
    ages: tuple[float, ...]  # over AGE_BANDS
    cells: tuple[float, float, float]  # home cell type: urban, suburban, rural
    trips_per_month: float
    calls: tuple[float, float, float]  # local, long-distance, international
    commutes: bool = False


ARCHETYPES = (
    Archetype(
        "commuter",
        0.22,
        ((8, 1.0, 3.0), (12.5, 1.0, 1.0), (18, 1.0, 3.0), (21.5, 1.5, 2.0)),
        ((11, 2.0, 1.5), (15.5, 2.5, 1.5), (21, 2.0, 2.0)),
        0.85,
        1.0,
        (0.42, 0.13, 0.06, 0.14, 0.22, 0.006, 0.0006),
        (0.14, 0.16, 0.16, 0.16, 0.04, 0.08, 0.14, 0.12),
        0.15,
        (0.2, 0.4, 0.3, 0.1),
        (0.08, 0.35, 0.32, 0.17, 0.07, 0.01),
        (0.45, 0.45, 0.1),
        0.1,
        (0.82, 0.15, 0.03),
        True,
    ),
    Archetype(
        "student",
        0.14,
        ((10, 1.5, 1.0), (13, 1.0, 1.5), (17, 1.5, 1.2), (22, 2.0, 3.0), (1, 1.5, 1.2)),
        ((13, 3.0, 2.0), (18, 2.0, 1.2), (23, 2.5, 3.0), (2, 1.5, 1.5)),
        1.15,
        1.25,
        (0.58, 0.05, 0.05, 0.12, 0.12, 0.006, 0.0006),
        (0.12, 0.24, 0.14, 0.22, 0.18, 0.05, 0.01, 0.04),
        0.6,
        (0.45, 0.4, 0.12, 0.03),
        (0.85, 0.15, 0, 0, 0, 0),
        (0.6, 0.3, 0.1),
        0.05,
        (0.78, 0.2, 0.02),
    ),
    Archetype(
        "night_worker",
        0.08,
        ((23, 2.0, 3.0), (2, 2.0, 3.0), (5.5, 1.5, 1.5), (18, 2.0, 1.0)),
        ((1, 2.0, 2.0), (21, 3.0, 2.0), (15, 3.0, 1.0)),
        1.0,
        0.95,
        (0.5, 0.1, 0.05, 0.15, 0.14, 0.006, 0.0006),
        (0.2, 0.2, 0.12, 0.12, 0.2, 0.06, 0.04, 0.06),
        0.4,
        (0.35, 0.4, 0.2, 0.05),
        (0.15, 0.35, 0.3, 0.15, 0.05, 0),
        (0.4, 0.4, 0.2),
        0.05,
        (0.82, 0.15, 0.03),
    ),
    Archetype(
        "traveller",
        0.07,
        ((7.5, 1.5, 2.0), (12, 2.0, 1.5), (19, 2.0, 2.0), (22, 1.5, 1.5)),
        ((10, 2.0, 1.5), (15, 3.0, 1.5), (21, 2.0, 1.5)),
        0.95,
        1.1,
        (0.38, 0.16, 0.08, 0.2, 0.15, 0.006, 0.0006),
        (0.16, 0.1, 0.14, 0.18, 0.03, 0.07, 0.12, 0.2),
        0.1,
        (0.1, 0.3, 0.4, 0.2),
        (0.05, 0.3, 0.35, 0.2, 0.08, 0.02),
        (0.6, 0.35, 0.05),
        1.6,
        (0.65, 0.2, 0.15),
    ),
    Archetype(
        "family",
        0.2,
        ((7, 1.0, 1.5), (12, 1.5, 1.0), (16, 2.0, 1.2), (20.5, 2.0, 3.0)),
        ((10, 2.0, 2.0), (15, 3.0, 2.0), (20, 2.0, 2.0)),
        1.1,
        0.9,
        (0.45, 0.17, 0.07, 0.14, 0.12, 0.006, 0.0006),
        (0.26, 0.14, 0.1, 0.16, 0.06, 0.16, 0.06, 0.06),
        0.2,
        (0.2, 0.35, 0.3, 0.15),
        (0.02, 0.25, 0.4, 0.25, 0.07, 0.01),
        (0.3, 0.5, 0.2),
        0.15,
        (0.76, 0.2, 0.04),
    ),
    Archetype(
        "business",
        0.12,
        ((9, 1.5, 3.0), (11, 1.5, 2.0), (14.5, 2.0, 2.5), (17.5, 1.0, 2.0), (20.5, 1.5, 1.0)),
        ((11, 3.0, 1.0), (19, 3.0, 1.0)),
        0.6,
        1.1,
        (0.3, 0.3, 0.06, 0.18, 0.14, 0.006, 0.0006),
        (0.1, 0.06, 0.1, 0.2, 0.02, 0.06, 0.26, 0.2),
        0.05,
        (0.05, 0.2, 0.4, 0.35),
        (0.01, 0.25, 0.4, 0.25, 0.08, 0.01),
        (0.7, 0.25, 0.05),
        0.6,
        (0.58, 0.3, 0.12),
    ),
    Archetype(
        "retiree",
        0.17,
        ((8, 2.0, 2.0), (10.5, 2.0, 2.0), (15, 2.0, 2.0), (19, 2.0, 1.5)),
        ((8, 2.0, 2.0), (10.5, 2.0, 2.0), (15, 2.0, 2.0), (19, 2.0, 1.5)),
        1.0,
        0.6,
        (0.33, 0.3, 0.1, 0.1, 0.1, 0.006, 0.0006),
        (0.3, 0.12, 0.1, 0.14, 0.02, 0.1, 0.18, 0.04),
        0.3,
        (0.45, 0.4, 0.12, 0.03),
        (0, 0, 0, 0.05, 0.35, 0.6),
        (0.25, 0.4, 0.35),
        0.1,
        (0.72, 0.25, 0.03),
    ),
)
# Hour-of-day multipliers: (what, hours, factor). Episode types first, then OTT categories.
EPISODE_HOURS = (
    (E_VOICE, range(9, 21), 1.5),
    (E_VOICE, (0, 1, 2, 3, 4, 5), 0.3),
    (E_MOVE, (0, 1, 2, 3, 4, 5), 0.2),
    (E_MOVE, RUSH_HOURS, 1.6),
    (E_OTT, range(19, 24), 1.3),
    (E_TOPUP, range(9, 21), 2.0),
    (E_TOPUP, range(0, 7), 0.1),
    (E_INQUIRY, range(9, 20), 2.5),
    (E_INQUIRY, (*range(0, 8), 22, 23), 0.05),
)
COMMUTE_MOVE_FACTOR = 2.5  # commuters' extra location updates at weekday rush hours
CATEGORY_HOURS = (
    ("news", (6, 7, 8, 9), 2.5),
    ("navigation", RUSH_HOURS, 2.5),
    ("music", RUSH_HOURS, 1.8),
    ("gaming", (21, 22, 23, 0, 1, 2, 3), 2.2),
    ("video", (19, 20, 21, 22, 23), 1.8),
    ("short_video", (12, 13, 21, 22, 23, 0), 1.5),
    ("shopping", (12, 13, 20, 21, 22), 1.5),
)
CATEGORY_WEEKEND = {"video": 1.3, "gaming": 1.3, "shopping": 1.2, "news": 0.7, "navigation": 0.6}
WIFI_HOURS = np.array([1.0] * 7 + [0.25] * 3 + [0.55] * 7 + [0.35] * 3 + [1.0] * 4)  # P(Wi-Fi) multiplier by local hour
# OTT behaviour within a session chain
CHAIN_CONTINUE = 0.6  # P(another app session follows in the same episode)
MAX_CHAIN = 8
P_SAME_APP, P_RELATED_APP = 0.35, 0.25  # next session: same app / a related app / else a fresh draw from taste
RELATED_APPS = 3  # per app: two of its category and one of its companion category
APP_TASTE_SHAPE = 0.35  # Gamma shape of a user's app weights: small = a few favourites
ACTION_PROBS = np.array(
    [
        [0.5, 0.2, 0.3],
        [0.7, 0.1, 0.2],
        [0.65, 0.2, 0.15],
        [0.5, 0.35, 0.15],
        [0.7, 0.1, 0.2],
        [0.6, 0.2, 0.2],
        [0.6, 0.25, 0.15],
        [0.5, 0.35, 0.15],
    ]
)  # (C, 3)
SESSION_MINUTES = np.array([20.0, 6.0, 12.0, 4.0, 15.0, 5.0, 3.0, 12.0])  # median per category
MB_PER_MINUTE = np.array([6.0, 5.0, 0.8, 1.2, 0.8, 1.5, 1.2, 0.4])
NET_MB = np.array([1.3, 1.0, 1.3])  # 5G, 4G, Wi-Fi: higher bit rates where the link allows
# Incidents: base probability per exposure, scaled by the user-day network quality and the network
VIDEO_INCIDENT_BASE, GAMING_LAG_BASE, CALL_DROP_BASE, SETUP_FAIL_BASE, SLOW_DATA_BASE = 0.022, 0.018, 0.006, 0.002, 0.014
NET_INCIDENT = np.array([0.5, 1.3, 0.35])  # OTT over 5G, 4G, Wi-Fi
VOICE_NET_INCIDENT = np.array([0.7, 1.0, 2.5])  # VoNR, VoLTE, fallback
DATA_NET_INCIDENT = np.array([0.4, 1.0, 2.5])  # 5G SA, 4G, 3G
PEAK_CONGESTION = 1.5  # cellular incidents in the evening peak (19-22 h)
DRIFT_RHO, DRIFT_SIGMA = 0.7, 0.5  # weekly AR(1) of each user's log network quality
OUTAGE_SHARE, OUTAGE_MAX_WEEKS, OUTAGE_FACTOR = 0.25, 3, 3.0  # users hit by a bad spell of 1-3 weeks, incidents x3
# Events an episode yields on average (calibrates episode counts to events_per_user_per_day)
EVENTS_PER_EPISODE = np.array([2.4, 1.35, 1.75, 1.05, 2.1, 1.75, 1.0])
DERIVED_PER_DAY = 2.0  # daily usage records, bills, complaints... that come on top of episodes
SMS_PROBS = np.array([0.35, 0.4, 0.03, 0.07, 0.1, 0.05])
INQUIRY_PROBS = np.array([0.3, 0.3, 0.1, 0.15, 0.15])


# ----------------------------------------------------------------------------------------------------
# Sampling helpers
# ----------------------------------------------------------------------------------------------------


class CategoricalRows:
    """R categorical distributions over K outcomes, sampled together by inverting each row's CDF.

    Small tables (a few archetypes or categories) are laid end to end, row r shifted by r, into one
    increasing array: `searchsorted(flat, r + u)` runs in cache. Large per-user tables would miss the
    cache at every step of that global search, so there a branchless binary search inside each row
    (ceil(log2 K) vectorized steps over the row's one or two cache lines) serves all draws at once.
    """

    SMALL = 1 << 15  # table entries up to which the global search stays in cache

    def __init__(self, weights: np.ndarray):
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 2 or (weights < 0).any():
            raise ValueError(f"weights must be a non-negative (R, K) array, got shape {weights.shape}")
        total = weights.sum(axis=1, keepdims=True)
        if (total <= 0).any():
            raise ValueError(f"row {int(np.flatnonzero(total[:, 0] <= 0)[0])} of the weights has no mass")
        cdf = np.cumsum(weights / total, axis=1)
        cdf[:, -1] = 1.0  # every uniform in [0, 1) falls inside its row
        self.num_rows, self.num_outcomes = weights.shape
        self.small = weights.size <= self.SMALL
        self.cdf = (cdf + np.arange(self.num_rows)[:, None]).ravel() if self.small else cdf.ravel()

    def sample(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(n,) int32 outcome of one draw from each given row: the first k with cdf[row, k] > u."""
        rows = np.asarray(rows, dtype=np.int64)
        u = rng.random(len(rows))
        start = rows * self.num_outcomes
        if self.small:
            u += rows
            return (np.searchsorted(self.cdf, u, side="right") - start).astype(np.int32)
        idx = start  # in place from here on: these arrays are as long as the number of draws
        probe = np.empty(len(rows))
        below = np.empty(len(rows), dtype=bool)
        length = self.num_outcomes
        while length > 1:
            half = length // 2
            np.take(self.cdf, idx + (half - 1), out=probe)
            np.less_equal(probe, u, out=below)
            idx += below * half
            length -= half
        np.take(self.cdf, idx, out=probe)
        idx += probe <= u
        idx -= rows * self.num_outcomes
        return idx.astype(np.int32)


def _hour_profile(bumps: tuple[tuple[float, float, float], ...]) -> np.ndarray:
    """(24,) activity by local hour: circular Gaussian bumps over a small floor."""
    hours = np.arange(24) + 0.5
    out = np.full(24, 0.03)
    for peak, width, weight in bumps:
        d = np.abs(hours - peak)
        d = np.minimum(d, 24 - d)
        out += weight * np.exp(-0.5 * (d / width) ** 2)
    return out / out.sum()


def _lognormal(rng: np.random.Generator, median: np.ndarray | float, sigma: float, n: int) -> np.ndarray:
    return median * np.exp(sigma * rng.standard_normal(n))


def _uniform(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    return rng.uniform(low, high, n).astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Calendar, world and population
# ----------------------------------------------------------------------------------------------------


@dataclass
class Calendar:
    """The observation window's local days: UTC second of each local midnight (D+1 values, the last is the cutoff)."""

    day_start: np.ndarray  # (D+1,) int64
    weekend: np.ndarray  # (D,) bool
    month_start: np.ndarray  # (D,) bool: the local 1st of a month

    @classmethod
    def build(cls, start_date: str, days: int, timezone: str) -> Calendar:
        tz = ZoneInfo(timezone)
        dates = [date.fromisoformat(start_date) + timedelta(days=d) for d in range(days + 1)]
        # Local midnights via zoneinfo so that DST days last 23 or 25 hours (a loop over days, not events).
        day_start = np.array([int(datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()) for d in dates], dtype=np.int64)
        return cls(day_start, np.array([d.weekday() >= 5 for d in dates[:-1]]), np.array([d.day == 1 for d in dates[:-1]]))

    @property
    def days(self) -> int:
        return len(self.weekend)

    @property
    def cutoff(self) -> int:
        return int(self.day_start[-1])

    def day_of(self, t: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.day_start, t, side="right") - 1


@dataclass
class World:
    """Seeded structure shared by all users: app popularity, related apps, region quality."""

    catalog: Catalog
    app_popularity: np.ndarray  # (A,)
    related: np.ndarray  # (A, RELATED_APPS) app index
    region_quality: np.ndarray  # (R,) incident multiplier
    country_popularity: np.ndarray  # (K,)

    @classmethod
    def build(cls, catalog: Catalog, rng: np.random.Generator) -> World:
        A, C = catalog.num_apps, len(cat.CATEGORIES)
        rank = np.empty(A)
        for c in range(C):  # Zipf popularity inside each category, random order of apps
            members = np.flatnonzero(catalog.app_category == c)
            rank[members] = rng.permutation(len(members))
        popularity = 1.0 / (rank + 1.0) ** 0.9
        related = np.empty((A, RELATED_APPS), np.int64)
        companion = np.array([cat.CATEGORIES.index(cat.COMPANION[name]) for name in cat.CATEGORIES])
        for c in range(C):  # per category (a loop over 8): related apps drawn by popularity
            members = np.flatnonzero(catalog.app_category == c)
            partners = np.flatnonzero(catalog.app_category == companion[c])
            same = _popular_choice(rng, members, popularity, (len(members), RELATED_APPS - 1))
            same = np.where(same == members[:, None], np.roll(members, 1)[:, None], same) if len(members) > 1 else same
            related[members, : RELATED_APPS - 1] = same
            related[members, RELATED_APPS - 1] = _popular_choice(rng, partners, popularity, (len(members),))
        R, K = catalog.location.shape[0], catalog.roaming.shape[0]
        region_quality = np.exp(rng.normal(0.0, 0.3, R))
        country_popularity = 1.0 / (rng.permutation(K) + 1.0)
        return cls(catalog, popularity, related, region_quality, country_popularity / country_popularity.sum())


def _popular_choice(rng, members: np.ndarray, popularity: np.ndarray, shape) -> np.ndarray:
    p = popularity[members] / popularity[members].sum()
    return members[rng.choice(len(members), size=shape, p=p)]


@dataclass
class Population:
    """Every user's attributes (public: the users table) and latent traits (hidden), as arrays."""

    archetype: np.ndarray
    age: np.ndarray
    region: np.ndarray
    cell: np.ndarray
    prepaid: np.ndarray
    tier: np.ndarray  # at the start of the window
    device_5g: np.ndarray
    brand: np.ndarray
    tenure: np.ndarray
    family_lines: np.ndarray
    home_broadband: np.ndarray
    fee_factor: np.ndarray
    # hidden
    activity: np.ndarray  # volume multiplier
    time_shift: np.ndarray  # seconds: personal shift of the daily rhythm
    quality: np.ndarray  # personal network quality multiplier (location within the region, building...)
    price_sensitivity: np.ndarray  # z-score
    complaint_propensity: np.ndarray
    care_channel: np.ndarray
    pay_channel: np.ndarray
    topup_channel: np.ndarray
    late_payer: np.ndarray
    treated: np.ndarray  # campaign arm, drawn for everyone; used for eligible users

    @classmethod
    def sample(cls, n: int, num_regions: int, treatment_fraction: float, rng: np.random.Generator) -> Population:
        arch = CategoricalRows(np.array([[a.share for a in ARCHETYPES]])).sample(np.zeros(n), rng)

        def per_arch(attr: str) -> np.ndarray:
            return CategoricalRows(np.array([getattr(a, attr) for a in ARCHETYPES])).sample(arch, rng)

        tier = per_arch("tiers")
        cell = per_arch("cells")
        prepaid = rng.random(n) < np.array([a.prepaid for a in ARCHETYPES])[arch]
        brand = CategoricalRows(np.array([BRAND_SHARE])).sample(np.zeros(n), rng)
        p5g = np.minimum(TIER_5G[tier] * np.where(brand == 0, 1.15, 1.0) * np.where(cell == 2, 0.7, 1.0), 0.97)
        age = per_arch("ages")
        tenure = np.clip(rng.exponential(np.where(age == 0, 14.0, 42.0)), 1, 240).astype(np.int32)
        family = np.array([a.name == "family" for a in ARCHETYPES])[arch]
        lines = np.where(family, 2 + rng.poisson(1.2, n), 1 + (rng.random(n) < 0.1)).astype(np.int32)
        young = age <= 1
        care_w = np.where(young[:, None], [[0.2, 0.45, 0.1, 0.25]], [[0.55, 0.15, 0.25, 0.05]])
        return cls(
            archetype=arch,
            age=age,
            region=rng.integers(0, num_regions, n).astype(np.int32),
            cell=cell,
            prepaid=prepaid,
            tier=tier,
            device_5g=rng.random(n) < p5g,
            brand=brand,
            tenure=tenure,
            family_lines=lines,
            home_broadband=rng.random(n) < np.where(family, 0.75, 0.45),
            fee_factor=np.exp(rng.normal(0.0, 0.08, n)),
            activity=np.exp(rng.normal(-0.125, 0.5, n)) * np.array([a.activity for a in ARCHETYPES])[arch],
            time_shift=rng.normal(0.0, 1_800.0, n).astype(np.int64),
            quality=np.exp(rng.normal(0.0, 0.35, n)),
            price_sensitivity=rng.standard_normal(n) + 0.5 * prepaid + 0.3 * young,
            complaint_propensity=np.exp(rng.normal(0.0, 0.6, n)),
            care_channel=CategoricalRows(care_w).sample(np.arange(n), rng),
            pay_channel=CategoricalRows(np.array([[0.4, 0.3, 0.2, 0.1]])).sample(np.zeros(n), rng),
            topup_channel=CategoricalRows(np.array([[0.45, 0.25, 0.2, 0.1]])).sample(np.zeros(n), rng),
            late_payer=rng.random(n) < 0.08,
            treated=rng.random(n) < treatment_fraction,
        )

    def users_table(self, user_ids: np.ndarray, tier_at_cutoff: np.ndarray, regions: tuple[str, ...]) -> pd.DataFrame:
        """The public users table; the plan tier and fee are those at the end of the window."""
        return pd.DataFrame(
            {
                "user_id": user_ids,
                "archetype": np.array([a.name for a in ARCHETYPES])[self.archetype],
                "age_band": np.array(AGE_BANDS)[self.age],
                "region": np.array(regions)[self.region],
                "cell_type": np.array(cat.CELL_TYPES)[self.cell],
                "plan_tier": np.array(cat.TIERS)[tier_at_cutoff],
                "payment_type": np.where(self.prepaid, "prepaid", "postpaid"),
                "monthly_fee": np.round(TIER_FEE[tier_at_cutoff] * self.fee_factor, 2),
                "device_network": np.where(self.device_5g, "5G", "4G"),
                "device_brand": np.array(BRANDS)[self.brand],
                "device_os": np.array(BRAND_OS)[self.brand],
                "tenure_months": self.tenure,
                "family_lines": self.family_lines,
                "home_broadband": self.home_broadband,
            }
        )


# ----------------------------------------------------------------------------------------------------
# One shard
# ----------------------------------------------------------------------------------------------------


@dataclass
class Events:
    """A batch of events of one shard (user = index inside the shard)."""

    user: np.ndarray  # (N,) int64
    time: np.ndarray  # (N,) int64 unix seconds
    behavior: np.ndarray  # (N,) int32
    value: np.ndarray  # (N,) float32, NaN where absent
    duration: np.ndarray  # (N,) float32 seconds, NaN where absent

    @classmethod
    def of(cls, user, time, behavior, value=None, duration=None) -> Events:
        n = len(user)
        nan = np.full(n, np.nan, np.float32)
        for name, array in (("time", time), ("behavior", behavior), ("value", value), ("duration", duration)):
            if array is not None and np.shape(array) != (n,):
                raise ValueError(f"Events.of: {name} has shape {np.shape(array)}, expected ({n},)")
        return cls(
            np.asarray(user, np.int64),
            np.asarray(time, np.int64),
            np.asarray(behavior, np.int32),
            nan if value is None else np.round(np.asarray(value, np.float32), 1),
            nan if duration is None else np.round(np.asarray(duration, np.float32)),
        )


@dataclass
class Episodes:
    """Episodes of one type: a burst of related events starting at `start`."""

    user: np.ndarray
    day: np.ndarray
    hour: np.ndarray  # local hour of the start
    weekend: np.ndarray
    start: np.ndarray

    def take(self, idx: np.ndarray) -> Episodes:
        return Episodes(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


@dataclass
class AppSessions:
    """The app sessions of a shard's OTT episodes, one row per chain step (`ep`: its episode)."""

    ep: np.ndarray
    user: np.ndarray
    day: np.ndarray
    hour: np.ndarray  # local hour of the episode's start
    app: np.ndarray
    category: np.ndarray
    action: np.ndarray
    t: np.ndarray  # start, unix seconds
    dur: np.ndarray  # seconds
    net: np.ndarray  # 0 5G, 1 4G, 2 Wi-Fi


TOD_PHRASES = ("late night", "morning rush hour", "morning", "lunch break", "afternoon", "evening rush hour", "evening")
TOD_OF_HOUR = np.array([0] * 6 + [2] + [1] * 3 + [2] * 2 + [3] * 2 + [4] * 3 + [5] * 3 + [6] * 3 + [0])
DAY_PHRASES = ("one day",) + tuple(f"{d} days" for d in range(2, 15)) + ("more than two weeks",)
INCIDENT_PHRASES = ("video buffering", "dropped calls", "slow mobile data")
SCENARIOS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # kind: (templates, axes)
    "poor_video": (
        (
            "Poor video quality during the {tod} on {app}",
            "Buffering and a resolution drop while watching {app} in the {tod}",
            "Streaming on {app} keeps stalling in the {tod}",
        ),
        ("tod", "app"),
    ),
    "playback_failure": (
        ("Playback failure after repeated buffering on {app}", "Video on {app} freezes, drops resolution and then fails to play"),
        ("app",),
    ),
    "commute_streaming": (
        ("Commute streaming on {app} during the {tod}", "Uses {app} on the way to or from work in the {tod}"),
        ("tod", "app"),
    ),
    "late_night_gaming": (("Late-night gaming session on {app}", "Plays {app} online late at night"), ("app",)),
    "weekend_binge": (("Weekend binge-watching on {app}", "Watches several episodes in a row on {app} at the weekend"), ("app",)),
    "dropped_call": (
        ("Dropped call followed by an immediate redial", "A call drops in the {tod} and the user calls back at once"),
        ("tod",),
    ),
    "topup_data": (
        ("Tops up the prepaid balance and starts using mobile data right away", "Prepaid top-up followed by a mobile data session"),
        (),
    ),
    "roaming": (
        ("Roaming abroad in {country} for {days}", "Travels to {country} and uses roaming services for {days}"),
        ("country", "days"),
    ),
    "complaint": (
        ("Complains to customer care after repeated {topic}", "Contacts customer care about {topic} after a run of network problems"),
        ("topic",),
    ),
    "shopping_checkout": (
        ("Online shopping checkout on {app} confirmed with an SMS code", "Orders on {app} and receives a verification code by SMS"),
        ("app",),
    ),
    "metro_commute": (
        ("Commutes across the city's cells in the {tod}", "Daily commute through metro and highway coverage in the {tod}"),
        ("tod",),
    ),
}


class ScenarioTexts:
    """All scenario sentences rendered once per data set; a scenario's text is then an array lookup."""

    def __init__(self, catalog: Catalog):
        axes = {
            "tod": TOD_PHRASES,
            "app": tuple(catalog.app_name),
            "country": catalog.country_names,
            "days": DAY_PHRASES,
            "topic": INCIDENT_PHRASES,
        }
        self.tables: dict[str, np.ndarray] = {}
        for kind, (templates, names) in SCENARIOS.items():
            shape = (len(templates),) + tuple(len(axes[a]) for a in names)
            table = np.empty(shape, dtype=object)
            for index in np.ndindex(*shape):  # a few thousand sentences per data set, not per event
                table[index] = templates[index[0]].format(**{a: axes[a][i] for a, i in zip(names, index[1:])})
            self.tables[kind] = table


class ShardSimulator:
    """Simulates the users `lo:hi` of the population over the calendar."""

    def __init__(
        self,
        cfg: SimulatorConfig,
        world: World,
        calendar: Calendar,
        population: Population,
        texts: ScenarioTexts,
        lo: int,
        hi: int,
        rng: np.random.Generator,
    ):
        self.cfg, self.world, self.cal, self.texts, self.rng = cfg, world, calendar, texts, rng
        self.catalog = world.catalog
        self.n = hi - lo
        self.p = Population(*(getattr(population, f.name)[lo:hi] for f in dataclasses.fields(Population)))
        self.parts: list[Events] = []
        self.scenes: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # user, start, end, text
        weeks = calendar.days / 7.0
        self.scene_target = cfg.scenarios_per_user_per_week * self.n * weeks / len(SCENARIOS)
        table = self.catalog.table
        self.cellular_mb = (table["value_unit"].eq("MB") & table["network"].ne("Wi-Fi")).to_numpy()
        self.call_seconds = table["value_unit"].eq("seconds").to_numpy()

    # -- helpers -------------------------------------------------------------------------------------

    def emit(self, user, t, behavior, value=None, duration=None) -> None:
        self.parts.append(Events.of(user, t, behavior, value, duration))

    def scenario(self, kind: str, user: np.ndarray, start: np.ndarray, end: np.ndarray, **axes: np.ndarray) -> None:
        """Keep a balanced random subset of the candidate windows of `kind` and give each its sentence."""
        if len(user) == 0 or self.scene_target <= 0:
            return
        keep = self.rng.random(len(user)) < min(1.0, self.scene_target / len(user))
        table = self.texts.tables[kind]
        template = self.rng.integers(0, table.shape[0], int(keep.sum()))
        names = SCENARIOS[kind][1]
        text = table[(template,) + tuple(np.asarray(axes[a])[keep] for a in names)]
        self.scenes.append((user[keep], start[keep], end[keep], text))

    def cellular_5g(self, user: np.ndarray) -> np.ndarray:
        """(n,) bool: the user's device is on 5G rather than 4G (5G device and 5G coverage)."""
        return self.p.device_5g[user] & (self.rng.random(len(user)) < CELL_5G_COVERAGE[self.p.cell[user]])

    def chain_times(self, start: np.ndarray, length: np.ndarray, step: np.ndarray) -> np.ndarray:
        """Start time of every event of every episode: episode start + the summed `step`s before it (ragged)."""
        ends = np.cumsum(step)
        first = np.cumsum(length) - length
        before = ends - step
        return np.repeat(start, length) + (before - np.repeat(before[first], length)).astype(np.int64)

    # -- the day and its episodes --------------------------------------------------------------------

    def quality(self) -> np.ndarray:
        """(U, D) incident multiplier per user-day: place and device x weekly AR(1) drift x outage weeks."""
        U, D, rng = self.n, self.cal.days, self.rng
        W = (D + 6) // 7
        drift = np.empty((U, W))  # stationary AR(1) with standard deviation DRIFT_SIGMA
        drift[:, 0] = rng.normal(0.0, DRIFT_SIGMA, U)
        for w in range(1, W):  # a loop over weeks: slow variation that only a long history reveals
            drift[:, w] = DRIFT_RHO * drift[:, w - 1] + rng.normal(0.0, DRIFT_SIGMA * np.sqrt(1 - DRIFT_RHO**2), U)
        outage = np.ones((U, W))
        hit = np.flatnonzero(rng.random(U) < OUTAGE_SHARE)
        span = rng.integers(1, OUTAGE_MAX_WEEKS + 1, len(hit))
        weeks = ragged_arange(rng.integers(0, W, len(hit)), span)
        rows = np.repeat(hit, span)
        ok = weeks < W
        outage[rows[ok], weeks[ok]] = OUTAGE_FACTOR
        base = self.world.region_quality[self.p.region] * CELL_QUALITY[self.p.cell] * self.p.quality
        # exp(drift - sigma^2 / 2) has mean 1: drift moves incidents around in time without changing their level
        return (base[:, None] * np.exp(drift - DRIFT_SIGMA**2 / 2) * outage)[:, np.arange(D) // 7]

    def trips(self) -> np.ndarray:
        """(U, D) country index of each user-day abroad, -1 at home; emits arrival events and roaming scenarios."""
        U, D, rng, catalog = self.n, self.cal.days, self.rng, self.catalog
        rate = np.array([a.trips_per_month for a in ARCHETYPES])[self.p.archetype] * D / 30.0
        count = rng.poisson(rate)
        user = np.repeat(np.arange(U), count)
        K = catalog.roaming.shape[0]
        favourite = CategoricalRows(self.world.country_popularity[None, :]).sample(np.zeros(U), rng)
        country = np.where(rng.random(len(user)) < 0.6, favourite[user], rng.integers(0, K, len(user)))
        length = np.minimum(rng.geometric(0.25, len(user)), 21)
        days = ragged_arange(rng.integers(0, D, len(user)), length)
        who = np.repeat(user, length)
        where = np.repeat(country, length)
        ok = days < D
        abroad = np.full((U, D), -1, np.int32)
        abroad[who[ok], days[ok]] = where[ok]
        # runs of consecutive days in one country (overlapping trips merge)
        prev = np.concatenate([np.full((U, 1), -1), abroad[:, :-1]], axis=1)
        nxt = np.concatenate([abroad[:, 1:], np.full((U, 1), -1)], axis=1)
        su, sd = np.nonzero((abroad >= 0) & (abroad != prev))
        _, ed = np.nonzero((abroad >= 0) & (abroad != nxt))
        c = abroad[su, sd]
        arrive = self.cal.day_start[sd] + _uniform(rng, 6 * HOUR, 20 * HOUR, len(su))
        register = arrive - _uniform(rng, 5, 120, len(su))
        self.emit(su, register, catalog.roaming[c, 4])
        self.emit(su, arrive, catalog.roaming[c, 5])
        buys = rng.random(len(su)) < 0.5
        self.emit(
            su[buys],
            arrive[buys] + _uniform(rng, 60, 1_800, int(buys.sum())),
            catalog.roaming[c[buys], 6],
            value=rng.choice([15.0, 30.0, 60.0], int(buys.sum())),
        )
        self.scenario("roaming", su, register, self.cal.day_start[ed + 1] - 1, country=c, days=np.minimum(ed - sd, len(DAY_PHRASES) - 1))
        return abroad

    def episodes(self, abroad: np.ndarray) -> tuple[Episodes, np.ndarray]:
        """All episodes of the shard (start times by inverse CDF over hourly profiles) and their types."""
        U, D, rng, p = self.n, self.cal.days, self.rng, self.p
        arch = p.archetype
        mix = np.array([a.episodes for a in ARCHETYPES])[arch]  # (U, T)
        mix[~p.prepaid, E_TOPUP] = 0.0
        mix /= mix.sum(axis=1, keepdims=True)
        per_episode = mix @ EVENTS_PER_EPISODE
        target = np.maximum(self.cfg.events_per_user_per_day - DERIVED_PER_DAY, 1.0)
        weekend_volume = np.array([a.weekend_volume for a in ARCHETYPES])[arch]
        lam = (target * p.activity / per_episode)[:, None] * np.where(self.cal.weekend[None, :], weekend_volume[:, None], 1.0)
        lam = lam * np.exp(rng.normal(-0.03, 0.25, (U, D))) * np.where(abroad >= 0, 0.8, 1.0)
        count = rng.poisson(lam).ravel()
        flat = np.repeat(np.arange(U * D), count)
        user, day = flat // D, flat % D
        weekend = self.cal.weekend[day]
        profiles = np.array([[_hour_profile(a.weekday_hours), _hour_profile(a.weekend_hours)] for a in ARCHETYPES]).reshape(-1, 24)
        hour = CategoricalRows(profiles).sample(arch[user] * 2 + weekend, rng)
        sec = (hour.astype(np.int64) * HOUR + rng.integers(0, HOUR, len(user)) + p.time_shift[user]) % DAY
        hour = (sec // HOUR).astype(np.int32)
        eps = Episodes(user, day, hour, weekend, self.cal.day_start[day] + sec)
        # episode type: user mix x hour-of-day modulation (x commute at weekday rush hours for commuters)
        hour_mod = np.ones((2, 24, len(EPISODES)))
        for episode, hours, factor in EPISODE_HOURS:
            hour_mod[:, list(hours), episode] *= factor
        commute = np.array([a.commutes for a in ARCHETYPES])[arch]
        weights = mix[:, None, None, :] * hour_mod[None]  # (U, 2, 24, T)
        weights[np.ix_(commute, [0], list(RUSH_HOURS), [E_MOVE])] *= COMMUTE_MOVE_FACTOR
        kind = CategoricalRows(weights.reshape(-1, len(EPISODES))).sample((user * 2 + weekend) * 24 + hour, rng)
        return eps, kind

    # -- episode types -------------------------------------------------------------------------------

    def ott(self, e: Episodes, abroad: np.ndarray, quality: np.ndarray) -> None:
        """App sessions in chains: same app, a related app, or a fresh draw from the user's taste."""
        length, apps = self._app_chains(e, self._fresh_app_sampler(e))
        s = self._app_sessions(e, length, apps, abroad)
        self._app_incidents(s, quality)
        self._shopping_orders(s)
        self._app_scenarios(e, length, apps, s)

    def _fresh_app_sampler(self, e: Episodes):
        """`fresh(idx)`: an app for each episode `idx` drawn from its user's taste; a closure, so that the
        (users x weekend x hour) sampling tables are built once per shard."""
        rng, p, catalog, world = self.rng, self.p, self.catalog, self.world
        C, A = len(cat.CATEGORIES), catalog.num_apps
        # taste: category by user x weekend x hour; app by user x category
        taste = np.array([a.categories for a in ARCHETYPES])[p.archetype] * rng.gamma(4.0, 0.25, (self.n, C))
        taste[:, [cat.CATEGORIES.index(c) for c in cat.VIDEO_LIKE]] *= TIER_STREAMING[p.tier][:, None]
        cat_hours = np.ones((2, 24, C))
        for name, hours, factor in CATEGORY_HOURS:
            cat_hours[:, list(hours), cat.CATEGORIES.index(name)] *= factor
        for name, factor in CATEGORY_WEEKEND.items():
            cat_hours[1, :, cat.CATEGORIES.index(name)] *= factor
        category_rows = CategoricalRows((taste[:, None, None, :] * cat_hours[None]).reshape(-1, C))
        per_cat = -(-A // C)
        slot_app = np.arange(C)[:, None] + C * np.arange(per_cat)[None, :]  # (C, per_cat): apps dealt round-robin
        valid = slot_app < A
        pop = np.where(valid, world.app_popularity[np.minimum(slot_app, A - 1)], 0.0)
        app_w = pop[None] * rng.gamma(APP_TASTE_SHAPE, 1.0, (self.n, C, per_cat)) + 1e-12 * valid[None]
        app_rows = CategoricalRows(app_w.reshape(-1, per_cat))
        row = (e.user * 2 + e.weekend) * 24 + e.hour

        def fresh(idx: np.ndarray) -> np.ndarray:
            c = category_rows.sample(row[idx], rng)
            return c + C * app_rows.sample(e.user[idx] * C + c, rng)

        return fresh

    def _app_chains(self, e: Episodes, fresh) -> tuple[np.ndarray, np.ndarray]:
        """(n,) chain length and (n, MAX_CHAIN) app of each step (-1 past the end) of the n episodes."""
        rng, world, n = self.rng, self.world, len(e.user)
        length = np.minimum(rng.geometric(1.0 - CHAIN_CONTINUE, n), MAX_CHAIN)
        apps = np.full((n, MAX_CHAIN), -1, np.int64)
        apps[:, 0] = fresh(np.arange(n))
        for j in range(1, MAX_CHAIN):  # chain steps: the next app depends on the previous one
            act = np.flatnonzero(length > j)
            nxt = apps[act, j - 1].copy()
            r = rng.random(len(act))
            rel = (r >= P_SAME_APP) & (r < P_SAME_APP + P_RELATED_APP)
            nxt[rel] = world.related[nxt[rel], rng.integers(0, RELATED_APPS, int(rel.sum()))]
            new = r >= P_SAME_APP + P_RELATED_APP
            nxt[new] = fresh(act[new])
            apps[act, j] = nxt
        return length, apps

    def _app_sessions(self, e: Episodes, length: np.ndarray, apps: np.ndarray, abroad: np.ndarray) -> AppSessions:
        """Emits one event per chain step (its time, network, action and volume) and returns the sessions."""
        rng, p, catalog = self.rng, self.p, self.catalog
        ep = np.repeat(np.arange(len(e.user)), length)
        app = apps[np.arange(MAX_CHAIN)[None, :] < length[:, None]]
        user, day, hour = e.user[ep], e.day[ep], e.hour[ep]
        category = catalog.app_category[app]
        N = len(app)
        minutes = _lognormal(rng, SESSION_MINUTES[category], 0.7, N)
        dur = np.maximum(minutes * 60.0, 10.0)
        t = self.chain_times(e.start, length, dur + rng.exponential(20.0, N))
        away = abroad[user, day] >= 0
        wifi = rng.random(N) < np.where(away, 0.8, np.where(p.home_broadband[user], 0.6, 0.3) * WIFI_HOURS[hour])
        net = np.where(wifi, 2, np.where(away | ~self.cellular_5g(user), 1, 0))
        action = CategoricalRows(ACTION_PROBS).sample(category, rng)
        self.emit(user, t, catalog.ott[app, action, net], value=minutes * MB_PER_MINUTE[category] * NET_MB[net], duration=dur)
        return AppSessions(ep, user, day, hour, app, category, action, t, dur, net)

    def _app_incidents(self, s: AppSessions, quality: np.ndarray) -> None:
        """Incidents during video and gaming sessions, likelier on a poor user-day and at the cellular evening peak."""
        rng, catalog = self.rng, self.catalog
        user, hour, app, t, dur, N = s.user, s.hour, s.app, s.t, s.dur, len(s.app)
        peak = np.where((hour >= 19) & (hour <= 22) & (s.net != 2), PEAK_CONGESTION, 1.0)
        risk = quality[user, s.day] * NET_INCIDENT[s.net] * peak
        video = catalog.video_incident[app, 0] >= 0
        hit = np.flatnonzero(video & (rng.random(N) < VIDEO_INCIDENT_BASE * risk))
        stall = t[hit] + (rng.uniform(0.1, 0.6, len(hit)) * np.minimum(dur[hit], 600.0)).astype(np.int64)
        drop = rng.random(len(hit)) < 0.6
        fail = drop & (rng.random(len(hit)) < 0.35)
        res_t = stall + _uniform(rng, 10, 90, len(hit))
        fail_t = res_t + _uniform(rng, 10, 120, len(hit))
        self.emit(user[hit], stall, catalog.video_incident[app[hit], 0])
        self.emit(user[hit][drop], res_t[drop], catalog.video_incident[app[hit][drop], 1])
        self.emit(user[hit][fail], fail_t[fail], catalog.video_incident[app[hit][fail], 2])
        end = np.where(fail, fail_t, np.where(drop, res_t, stall))
        self.scenario("poor_video", user[hit][~fail], t[hit][~fail], end[~fail], tod=TOD_OF_HOUR[hour[hit][~fail]], app=app[hit][~fail])
        self.scenario("playback_failure", user[hit][fail], t[hit][fail], end[fail], app=app[hit][fail])
        lag = np.flatnonzero((catalog.gaming_lag[app] >= 0) & (rng.random(N) < GAMING_LAG_BASE * risk))
        self.emit(
            user[lag],
            t[lag] + (rng.random(len(lag)) * dur[lag]).astype(np.int64),
            catalog.gaming_lag[app[lag]],
            value=rng.integers(150, 900, len(lag)),
        )

    def _shopping_orders(self, s: AppSessions) -> None:
        """An online order is confirmed by an SMS code."""
        rng = self.rng
        order = np.flatnonzero((s.category == C_SHOPPING) & (s.action == 1) & (rng.random(len(s.app)) < 0.8))  # action 1: places an order
        otp_t = s.t[order] + _uniform(rng, 20, 90, len(order))
        self.emit(s.user[order], otp_t, np.full(len(order), self.catalog.sms[3]))
        self.scenario("shopping_checkout", s.user[order], s.t[order], otp_t, app=s.app[order])

    def _app_scenarios(self, e: Episodes, length: np.ndarray, apps: np.ndarray, s: AppSessions) -> None:
        """Scenario windows over whole episodes: commute streaming, late-night gaming, weekend binge-watching."""
        first = np.cumsum(length) - length
        last = first + length - 1
        ep_end = s.t[last] + s.dur[last].astype(np.int64)
        first_cat = s.category[first]
        commuter = np.array([a.commutes for a in ARCHETYPES])[self.p.archetype[e.user]]
        sel = np.flatnonzero(commuter & ~e.weekend & np.isin(e.hour, RUSH_HOURS))
        self.scenario("commute_streaming", e.user[sel], e.start[sel], ep_end[sel], tod=TOD_OF_HOUR[e.hour[sel]], app=apps[sel, 0])
        sel = np.flatnonzero((first_cat == C_GAMING) & np.isin(e.hour, (23, 0, 1, 2, 3)))
        self.scenario("late_night_gaming", e.user[sel], e.start[sel], ep_end[sel], app=apps[sel, 0])
        video_steps = np.bincount(s.ep, weights=s.category == C_VIDEO, minlength=len(e.user))
        sel = np.flatnonzero(e.weekend & (first_cat == C_VIDEO) & (video_steps >= 3))
        self.scenario("weekend_binge", e.user[sel], e.start[sel], ep_end[sel], app=apps[sel, 0])

    def voice(self, e: Episodes, abroad: np.ndarray, quality: np.ndarray) -> None:
        """Calls (1-4 per episode); drops end a call early and are usually followed by a redial."""
        rng, p, catalog = self.rng, self.p, self.catalog
        length = np.minimum(rng.geometric(1 / 1.4, len(e.user)), 4)
        ep = np.repeat(np.arange(len(e.user)), length)
        user, day, N = e.user[ep], e.day[ep], len(ep)
        seconds = np.clip(_lognormal(rng, 90.0, 1.0, N), 5, 7_200)
        t = self.chain_times(e.start, length, seconds + rng.uniform(30, 900, N))
        kind = CategoricalRows(np.array([a.calls for a in ARCHETYPES])).sample(p.archetype[user], rng)
        outgoing = rng.random(N) < 0.5
        net = np.where(self.cellular_5g(user), 0, np.where(rng.random(N) < CELL_FALLBACK[p.cell[user]], 2, 1))
        country = abroad[user, day]
        away = country >= 0
        dropped = ~away & (rng.random(N) < CALL_DROP_BASE * quality[user, day] * VOICE_NET_INCIDENT[net])
        seconds = np.where(dropped, seconds * rng.uniform(0.1, 0.9, N), seconds)
        home = catalog.voice[kind, np.where(outgoing, 0, 1), (seconds >= 120).astype(np.int64), net]
        roam = catalog.roaming[np.maximum(country, 0), np.where(outgoing, 1, 2)]
        self.emit(user, t, np.where(away, roam, home), value=seconds, duration=seconds)
        d = np.flatnonzero(dropped)
        drop_t = t[d] + seconds[d].astype(np.int64)
        self.emit(user[d], drop_t, catalog.call_drop[kind[d]])
        again = rng.random(len(d)) < 0.75
        redial_t = drop_t[again] + _uniform(rng, 5, 60, int(again.sum()))
        redial_s = np.clip(_lognormal(rng, 60.0, 0.8, len(redial_t)), 5, 3_600)
        self.emit(user[d][again], redial_t, np.full(len(redial_t), catalog.redial), value=redial_s, duration=redial_s)
        self.scenario("dropped_call", user[d][again], t[d][again], redial_t, tod=TOD_OF_HOUR[e.hour[ep[d][again]]])
        fail = np.flatnonzero(~away & outgoing & (rng.random(N) < SETUP_FAIL_BASE * quality[user, day] * VOICE_NET_INCIDENT[net]))
        self.emit(user[fail], t[fail] - _uniform(rng, 20, 90, len(fail)), np.full(len(fail), catalog.call_setup_failure))

    def sms(self, e: Episodes, abroad: np.ndarray) -> None:
        rng, catalog = self.rng, self.catalog
        length = np.minimum(rng.geometric(1 / 1.8, len(e.user)), 6)
        ep = np.repeat(np.arange(len(e.user)), length)
        user, N = e.user[ep], len(ep)
        t = self.chain_times(e.start, length, rng.uniform(10, 300, N))
        kind = CategoricalRows(SMS_PROBS[None, :]).sample(np.zeros(N), rng)
        country = abroad[user, e.day[ep]]
        roam = (country >= 0) & np.isin(kind, (0, 2))
        self.emit(user, t, np.where(roam, catalog.roaming[np.maximum(country, 0), 3], catalog.sms[kind]))

    def data_session(
        self, user: np.ndarray, t: np.ndarray, country: np.ndarray, tether_p: float | np.ndarray = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """One mobile data session per row (roaming abroad); returns the network (0 5G, 1 4G, 2 3G) and duration."""
        rng, p, catalog, N = self.rng, self.p, self.catalog, len(user)
        mb = _lognormal(rng, 40.0, 1.3, N)
        seconds = np.clip(_lognormal(rng, 300.0, 1.0, N), 10, 4 * HOUR)
        net = np.where(self.cellular_5g(user), 0, np.where(rng.random(N) < CELL_FALLBACK[p.cell[user]], 2, 1))
        size = np.searchsorted([50.0, 500.0], mb)
        tether = rng.random(N) < tether_p
        mb = np.where(tether, mb * 6.0, mb)
        behavior = np.where(tether & (net < 2), catalog.tethering[np.minimum(net, 1)], catalog.data[net, size])
        self.emit(user, t, np.where(country >= 0, catalog.roaming[np.maximum(country, 0), 0], behavior), value=mb, duration=seconds)
        return np.where(country >= 0, 1, net), seconds

    def data(self, e: Episodes, abroad: np.ndarray, quality: np.ndarray) -> None:
        rng, p, catalog = self.rng, self.p, self.catalog
        country = abroad[e.user, e.day]
        sharer = np.isin(p.archetype[e.user], [i for i, a in enumerate(ARCHETYPES) if a.name in ("family", "business")])
        net, seconds = self.data_session(e.user, e.start, country, np.where(sharer, 0.15, 0.06))
        slow = np.flatnonzero((country < 0) & (rng.random(len(net)) < SLOW_DATA_BASE * quality[e.user, e.day] * DATA_NET_INCIDENT[net]))
        slow_t = e.start[slow] + (rng.random(len(slow)) * seconds[slow]).astype(np.int64)
        self.emit(e.user[slow], slow_t, catalog.slow_data[p.cell[e.user[slow]]])
        lost = rng.random(len(slow)) < 0.3
        self.emit(e.user[slow][lost], slow_t[lost] + _uniform(rng, 5, 60, int(lost.sum())), np.full(int(lost.sum()), catalog.data_lost))

    def move(self, e: Episodes, abroad: np.ndarray) -> None:
        """Location updates; commuters at weekday rush hours cross transit cells to work (morning) or home (evening)."""
        rng, p, catalog = self.rng, self.p, self.catalog
        n = len(e.user)
        commute = np.array([a.commutes for a in ARCHETYPES])[p.archetype[e.user]] & ~e.weekend & np.isin(e.hour, RUSH_HOURS)
        length = np.where(commute, 2 + rng.geometric(0.5, n), np.minimum(rng.geometric(0.5, n), 5))
        ep = np.repeat(np.arange(n), length)
        user, N = e.user[ep], len(ep)
        step = ragged_arange(np.zeros(n), length)
        t = self.chain_times(e.start, length, rng.exponential(300.0, N))
        R = catalog.location.shape[0]
        region = np.where(rng.random(N) < 0.9, p.region[user], rng.integers(0, R, N))
        cell = np.where(rng.random(N) < 0.7, p.cell[user], CategoricalRows(np.array([[0.6, 0.3, 0.1]])).sample(np.zeros(N), rng))
        is_last = step == length[ep] - 1
        morning = e.hour[ep] < 12
        cell = np.where(commute[ep] & is_last, np.where(morning, 0, p.cell[user]), cell)
        cell = np.where(commute[ep] & (step == 0), np.where(morning, p.cell[user], 0), cell)
        behavior = catalog.location[region, cell, np.where(self.cellular_5g(user), 0, 1)]
        transit = np.where(p.cell[user] == 2, 1, np.where(rng.random(N) < 0.2, 2, 0))
        behavior = np.where(commute[ep] & (step > 0) & ~is_last, catalog.transit[transit], behavior)
        country = abroad[user, e.day[ep]]
        self.emit(user, t, np.where(country >= 0, catalog.roaming[np.maximum(country, 0), 4], behavior))
        sel = np.flatnonzero(commute)
        last = np.cumsum(length) - 1
        self.scenario("metro_commute", e.user[sel], e.start[sel], t[last[sel]], tod=TOD_OF_HOUR[e.hour[sel]])

    def topup(self, e: Episodes, abroad: np.ndarray) -> None:
        """Prepaid top-ups, often followed within minutes by a data session (and sometimes an add-on)."""
        rng, p, catalog, n = self.rng, self.p, self.catalog, len(e.user)
        amount_w = np.array([[0.5, 0.3, 0.15, 0.05], [0.3, 0.4, 0.2, 0.1], [0.1, 0.3, 0.35, 0.25], [0.05, 0.2, 0.35, 0.4]])
        amount = CategoricalRows(amount_w).sample(p.tier[e.user], rng)
        self.emit(e.user, e.start, catalog.topup[amount, p.topup_channel[e.user]], value=np.array(cat.TOPUP_AMOUNTS, np.float32)[amount])
        follow = np.flatnonzero(rng.random(n) < 0.6)
        data_t = e.start[follow] + _uniform(rng, 30, 300, len(follow))
        self.data_session(e.user[follow], data_t, abroad[e.user[follow], e.day[follow]])
        self.scenario("topup_data", e.user[follow], e.start[follow], data_t)
        addon = np.flatnonzero(rng.random(n) < 0.15)
        size = rng.integers(0, 3, len(addon))
        self.emit(
            e.user[addon],
            e.start[addon] + _uniform(rng, 60, 600, len(addon)),
            catalog.data_addon[size],
            value=np.array([5.0, 15.0, 40.0], np.float32)[size],
        )

    def inquiry(self, e: Episodes) -> None:
        topic = CategoricalRows(INQUIRY_PROBS[None, :]).sample(np.zeros(len(e.user)), self.rng)
        self.emit(e.user, e.start, self.catalog.inquiry[topic, self.p.care_channel[e.user]])

    # -- records derived from the day's activity -----------------------------------------------------

    def user_day_sum(self, activity: list[tuple[Events, np.ndarray]], weight) -> np.ndarray:
        """(U*D,) sum of `weight(part)` per user-day over (part, user-day index of its events) pairs, without concatenating."""
        out = np.zeros(self.n * self.cal.days)
        for part, cell in activity:  # a handful of batches per shard
            out += np.bincount(cell, weights=weight(part), minlength=len(out))
        return out

    def daily_usage(self, activity: list[tuple[Events, np.ndarray]]) -> np.ndarray:
        """Daily usage records at local midnight; returns (U, D) cellular MB used."""
        U, D, catalog = self.n, self.cal.days, self.catalog
        mb = self.user_day_sum(activity, lambda e: np.where(self.cellular_mb[e.behavior], e.value, 0.0))
        minutes = self.user_day_sum(activity, lambda e: np.where(self.call_seconds[e.behavior], e.duration, 0.0)) / 60.0
        midnight = np.tile(self.cal.day_start[:D], U)
        users = np.repeat(np.arange(U), D)
        used = mb > 0
        self.emit(users[used], midnight[used], catalog.daily_data[np.searchsorted(cat.DAILY_DATA_EDGES_MB, mb[used])], value=mb[used])
        called = minutes > 0
        self.emit(
            users[called],
            midnight[called],
            catalog.daily_voice[np.searchsorted(cat.DAILY_VOICE_EDGES_MIN, minutes[called])],
            value=minutes[called],
        )
        return mb.reshape(U, D)

    def billing(self) -> None:
        """Monthly bill (postpaid) or renewal (prepaid) at local midnight of the 1st; payments days later."""
        rng, p, catalog, cal = self.rng, self.p, self.catalog, self.cal
        days = np.flatnonzero(cal.month_start)
        user = np.repeat(np.arange(self.n), len(days))
        day = np.tile(days, self.n)
        at = cal.day_start[day]
        fee = TIER_FEE[p.tier[user]] * p.fee_factor[user]
        post = ~p.prepaid[user]
        amount = fee * np.where(post, np.exp(rng.normal(0.05, 0.1, len(user))), 1.0)
        self.emit(user, at, np.where(post, catalog.bill[p.tier[user]], catalog.renewal[p.tier[user]]), value=amount)
        late = post & p.late_payer[user] & (rng.random(len(user)) < 0.6)
        delay = np.where(late, rng.integers(17, 26, len(user)), rng.integers(1, 15, len(user))) * DAY + _uniform(
            rng, 8 * HOUR, 22 * HOUR, len(user)
        )
        self.emit(user[late], at[late] + 16 * DAY + 10 * HOUR, np.full(int(late.sum()), catalog.overdue))
        self.emit(user[post], at[post] + delay[post], catalog.bill_paid[p.pay_channel[user[post]]], value=amount[post])

    def care_and_plans(self, activity: list[tuple[Events, np.ndarray]], mb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Complaints after incidents, plan changes and add-ons. Returns (U, D) incidents, (U,) complaints, tier at cutoff."""
        rng, p, catalog, cal = self.rng, self.p, self.catalog, self.cal
        U, D = self.n, cal.days
        per_kind = np.stack(
            [
                self.user_day_sum(activity, lambda e, k=k: catalog.incident_kind[e.behavior] == k)
                for k in (cat.INCIDENT_VIDEO, cat.INCIDENT_CALL, cat.INCIDENT_DATA)
            ],
            axis=-1,
        ).reshape(U, D, 3)
        incidents = per_kind.sum(axis=-1)
        window = np.cumsum(incidents, axis=1)
        last_week = window - np.concatenate([np.zeros((U, 7)), window[:, :-7]], axis=1)[:, :D]
        hazard = (0.006 * incidents + 0.002 * last_week) * p.complaint_propensity[:, None]
        cu, cd = np.nonzero(rng.random((U, D)) < -np.expm1(-hazard))
        keep = cd + 1 < D  # complaints come the next day
        cu, cd = cu[keep], cd[keep]
        topic = np.argmax(per_kind[cu, cd] + 1e-3 * rng.random((len(cu), 3)), axis=1)
        topic = np.where(incidents[cu, cd] > 0, topic, rng.integers(3, 5, len(cu)))
        complaint_t = cal.day_start[cd + 1] + _uniform(rng, 9 * HOUR, 20 * HOUR, len(cu))
        self.emit(cu, complaint_t, catalog.complaint[topic, p.care_channel[cu]])
        first_incident = cal.day_start[cd]
        talk = topic < 3
        self.scenario("complaint", cu[talk], first_incident[talk], complaint_t[talk], topic=topic[talk])
        complaints = np.bincount(cu, minlength=U)

        # plan changes: at most one per user in the window, driven by usage against the allowance and by incidents
        over = mb > TIER_ALLOWANCE_MB_DAY[p.tier][:, None]
        up_h = 0.0012 * np.exp(2.0 * over.mean(axis=1)) * np.where(p.device_5g & (p.tier <= 1), 1.5, 1.0)
        down_h = 0.0005 * (1.0 + 0.12 * last_week) * np.exp(0.5 * p.price_sensitivity)[:, None]
        up = (rng.random((U, D)) < up_h[:, None]) & (p.tier < 3)[:, None]
        down = (rng.random((U, D)) < down_h) & (p.tier > 0)[:, None]
        change = up | down
        who = np.flatnonzero(change.any(axis=1))
        when = np.argmax(change[who], axis=1)
        upgrade = up[who, when]
        tier = p.tier.copy()
        tier[who] += np.where(upgrade, 1, -1)
        t = cal.day_start[when] + _uniform(rng, 9 * HOUR, 21 * HOUR, len(who))
        self.emit(who, t, np.where(upgrade, catalog.upgrade[p.tier[who]], catalog.downgrade[p.tier[who]]))
        # data add-ons on days over the allowance; a streaming add-on for the favourite app now and then
        au, ad = np.nonzero(over & (rng.random((U, D)) < 0.04))
        self.emit(
            au,
            cal.day_start[ad] + _uniform(rng, 12 * HOUR, 23 * HOUR, len(au)),
            catalog.data_addon[rng.integers(0, 3, len(au))],
            value=rng.choice([5.0, 15.0, 40.0], len(au)),
        )
        addon_app = catalog.app_addon[self._favourite_apps(activity)]
        subs = np.flatnonzero((addon_app >= 0) & (rng.random(U) < 0.06 * TIER_STREAMING[p.tier]))
        self.emit(
            subs,
            cal.day_start[rng.integers(0, D, len(subs))] + _uniform(rng, 9 * HOUR, 23 * HOUR, len(subs)),
            addon_app[subs],
            value=rng.choice([9.0, 15.0], len(subs)),
        )
        intl = np.flatnonzero((np.array([a.calls[2] for a in ARCHETYPES])[p.archetype] > 0.1) & (rng.random(U) < 0.15))
        self.emit(
            intl,
            cal.day_start[rng.integers(0, D, len(intl))] + _uniform(rng, 9 * HOUR, 21 * HOUR, len(intl)),
            np.full(len(intl), catalog.intl_pack),
            value=np.full(len(intl), 20.0),
        )
        return incidents, complaints, tier

    def _favourite_apps(self, activity: list[tuple[Events, np.ndarray]]) -> np.ndarray:
        """(U,) the app each user opened most often (0 for a user without app sessions)."""
        A = self.catalog.num_apps
        app_of = np.full(self.catalog.num_behaviors, -1)
        app_of[self.catalog.ott.ravel()] = np.repeat(np.arange(A), self.catalog.ott[0].size)
        counts = np.zeros(self.n * A)
        for part, _ in activity:
            app = app_of[part.behavior]
            ott = app >= 0
            counts += np.bincount(part.user[ott] * A + app[ott], minlength=self.n * A)
        return counts.reshape(self.n, A).argmax(axis=1)

    # -- labels --------------------------------------------------------------------------------------

    def labels(self, incidents: np.ndarray, complaints: np.ndarray, mb: np.ndarray, tier: np.ndarray) -> dict[str, np.ndarray]:
        """Outcomes over the horizon after the window: logits of history (incidents, usage) and attributes."""
        rng, p, cc = self.rng, self.p, self.cfg.campaign
        U, D = self.n, self.cal.days
        weeks = D / 7.0
        rate = incidents.sum(axis=1) / weeks  # incidents a week over the whole window: long-term experience
        recent = incidents[:, -14:].sum(axis=1) / (min(D, 14) / 7.0)
        over = (mb > TIER_ALLOWANCE_MB_DAY[tier][:, None]).mean(axis=1)
        low_5g = p.device_5g & (tier <= 1)

        def draw(logit: np.ndarray, horizon_days: float = 30.0) -> np.ndarray:
            """Bernoulli outcome; `logit` is calibrated for 30 days and a constant hazard rescales it to the horizon."""
            p30 = 1.0 / (1.0 + np.exp(-logit))
            return (rng.random(U) < -np.expm1(np.log1p(-p30) * horizon_days / 30.0)).astype(np.float32)

        horizon = self.cfg.label_horizon_days
        churn = draw(
            -4.9
            + 1.1 * np.log1p(rate)
            + 0.15 * np.log1p(recent)
            + 0.45 * np.minimum(complaints, 3)
            + 0.5 * p.prepaid
            - 0.012 * p.tenure
            + 0.35 * p.price_sensitivity
            + 0.3 * (tier == 0),
            horizon,
        )
        upgrade_logit = -3.4 + 2.5 * over + 0.6 * low_5g - 0.3 * np.log1p(rate)
        upgrade = np.where(tier < 3, draw(upgrade_logit, horizon), 0.0)
        downgrade = np.where(
            tier > 0, draw(-4.3 + 0.9 * np.log1p(rate) + 0.6 * p.price_sensitivity - 1.5 * over + 0.3 * p.prepaid, horizon), 0.0
        )
        tau = (
            cc.base_effect
            + cc.heavy_user_effect * np.minimum(over / 0.3, 1.0)
            + cc.device_effect * low_5g
            + cc.incident_effect * np.minimum(rate / 10.0, 1.0)
        )
        treated = p.treated
        response = draw(upgrade_logit + 0.2 + treated * tau)
        eligible = tier < 3
        return dict(
            churn=churn,
            upgrade=upgrade.astype(np.float32),
            downgrade=downgrade.astype(np.float32),
            campaign_response=response,
            eligible=eligible,
            treated=treated,
        )

    # -- all together --------------------------------------------------------------------------------

    def run(self) -> tuple[Events, dict[str, np.ndarray], tuple, np.ndarray]:
        quality = self.quality()
        abroad = self.trips()
        eps, kind = self.episodes(abroad)
        by_kind = {k: eps.take(np.flatnonzero(kind == k)) for k in range(len(EPISODES))}
        self.ott(by_kind[E_OTT], abroad, quality)
        self.voice(by_kind[E_VOICE], abroad, quality)
        self.sms(by_kind[E_SMS], abroad)
        self.data(by_kind[E_DATA], abroad, quality)
        self.move(by_kind[E_MOVE], abroad)
        self.topup(by_kind[E_TOPUP], abroad)
        self.inquiry(by_kind[E_INQUIRY])
        D = self.cal.days
        activity = [(e, np.clip(self.cal.day_of(e.time), 0, D - 1) + D * e.user) for e in self.parts]  # events with their user-day
        mb = self.daily_usage(activity)
        self.billing()
        incidents, complaints, tier = self.care_and_plans(activity, mb)
        events = self._sorted(self.parts)
        labels = self.labels(incidents, complaints, mb, tier)
        return events, labels, self._scenes(), tier

    def _sorted(self, parts: list[Events]) -> Events:
        """All events inside the window, sorted by (user, time, behaviour), without duplicate keys."""
        start, cutoff = self.cal.day_start[0], self.cal.cutoff
        # one uint64 sort key: user (20 bits) | seconds into the window (30 bits) | behaviour (14 bits);
        # events outside the window get the largest key and are cut off the end of the order
        keys = []
        for e in parts:
            key = (
                (e.user.astype(np.uint64) << np.uint64(44))
                | (np.clip(e.time - start, 0, None).astype(np.uint64) << np.uint64(14))
                | e.behavior.astype(np.uint64)
            )
            key[(e.time < start) | (e.time >= cutoff)] = np.iinfo(np.uint64).max
            keys.append(key)
        key = np.concatenate(keys)
        order = np.argsort(key)
        key = key[order]
        inside = int(np.searchsorted(key, np.iinfo(np.uint64).max))
        unique = np.concatenate([[True], key[1:inside] != key[: inside - 1]])  # the same behaviour twice in one second is one record
        keep = order[:inside][unique[:inside]]
        return Events(*(np.concatenate([getattr(e, f.name) for e in parts])[keep] for f in dataclasses.fields(Events)))

    def _scenes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self.scenes:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, object)
        user, start, end, text = (np.concatenate(x) for x in zip(*self.scenes))
        inside = start < self.cal.cutoff  # chains that ran past the window's end lost their events
        user, start, end, text = user[inside], np.maximum(start[inside], self.cal.day_start[0]), end[inside], text[inside]
        end = np.minimum(np.maximum(end, start), self.cal.cutoff - 1)
        order = np.lexsort((end, start, user))
        user, start, end, text = user[order], start[order], end[order], text[order]
        unique = np.concatenate([[True], (user[1:] != user[:-1]) | (start[1:] != start[:-1]) | (end[1:] != end[:-1])])
        return user[unique], start[unique], end[unique], text[unique]


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _utc(seconds: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(seconds, np.int64) * 1_000_000_000, pa.timestamp("ns", tz="UTC"))


def _write_events(table: pa.Table, path: Path) -> None:
    # store_schema=False: dictionary-encoded id columns read back as plain strings, not categoricals;
    # statistics only where readers filter (user, time): min/max of the other string columns cost time
    pq.write_table(table, path, store_schema=False, write_statistics=["user_id", "timestamp"])


def _write_frame(frame: pd.DataFrame, path: Path) -> None:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)


def _events_table(ev: Events, user_ids: np.ndarray, catalog: Catalog) -> pa.Table:
    """Dictionary-encoded string columns straight from the integer indices: no string per event is built."""
    return pa.table(
        {
            "user_id": pa.DictionaryArray.from_arrays(pa.array(ev.user.astype(np.int32)), pa.array(user_ids.astype(str))),
            "timestamp": _utc(ev.time),
            "behavior_id": pa.DictionaryArray.from_arrays(pa.array(ev.behavior), pa.array(catalog.table["behavior_id"].to_numpy(str))),
            "value": pa.array(ev.value, from_pandas=True),
            "duration": pa.array(ev.duration, from_pandas=True),
            "source": pa.DictionaryArray.from_arrays(pa.array(catalog.source[ev.behavior]), pa.array(catalog.sources.astype(str))),
        }
    )


LABEL_TASKS = ("churn", "upgrade", "downgrade", "campaign_response")


def _labels_frame(user_ids: np.ndarray, labels: dict[str, np.ndarray], cutoff: int) -> pd.DataFrame:
    frames = []
    for task in LABEL_TASKS:
        rows = np.flatnonzero(labels["eligible"]) if task == "campaign_response" else np.arange(len(user_ids))
        treatment = (
            pd.array(labels["treated"][rows].astype(np.int8), dtype="Int8")
            if task == "campaign_response"
            else pd.array([pd.NA] * len(rows), dtype="Int8")
        )
        frames.append(
            pd.DataFrame({"user_id": user_ids[rows], "task": task, "label": labels[task][rows].astype(np.float32), "treatment": treatment})
        )
    out = pd.concat(frames, ignore_index=True)
    out["time"] = pd.to_datetime(np.full(len(out), cutoff, np.int64), unit="s", utc=True).astype("datetime64[ns, UTC]")
    return out


def simulate(cfg: SimulatorConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Write a synthetic operator data set (the contract's folder layout) to `out_dir`; returns a summary."""
    cfg.validate()
    started = time.perf_counter()
    out = Path(out_dir)
    if (out / "events").exists():
        shutil.rmtree(out / "events")  # a rerun must not leave shards of a larger earlier run behind
    (out / "events").mkdir(parents=True, exist_ok=True)
    catalog = build_catalog(cfg.num_apps, cfg.num_regions, cfg.num_countries)
    if catalog.num_behaviors >= 2**14:
        raise ValueError(f"num_apps={cfg.num_apps}: {catalog.num_behaviors} behaviours exceed the 16384 the sort key holds")
    calendar = Calendar.build(cfg.start_date, cfg.days, cfg.timezone)
    world = World.build(catalog, np.random.default_rng([cfg.seed, 2]))
    population = Population.sample(cfg.users, cfg.num_regions, cfg.campaign.treatment_fraction, np.random.default_rng([cfg.seed, 0]))
    width = max(6, len(str(cfg.users - 1)))
    user_ids = ("U" + pd.Series(np.arange(cfg.users)).astype(str).str.zfill(width)).to_numpy(object)
    texts = ScenarioTexts(catalog)
    shards = range(0, cfg.users, cfg.users_per_shard)
    tier_at_cutoff = population.tier.copy()
    label_frames, scene_frames, num_events = [], [], 0
    log.info(
        "simulating %d users x %d days (%s, %d behaviours) in %d shard(s) -> %s",
        cfg.users,
        cfg.days,
        cfg.timezone,
        catalog.num_behaviors,
        len(shards),
        out,
    )
    for i, lo in enumerate(tqdm(shards, desc="simulate", unit="shard", disable=not progress or None)):
        hi = min(lo + cfg.users_per_shard, cfg.users)
        shard = ShardSimulator(cfg, world, calendar, population, texts, lo, hi, np.random.default_rng([cfg.seed, 1, i]))
        events, labels, scenes, tier = shard.run()
        ids = user_ids[lo:hi]
        _write_events(_events_table(events, ids, catalog), out / "events" / f"part-{i:05d}.parquet")
        num_events += len(events.user)
        tier_at_cutoff[lo:hi] = tier
        label_frames.append(_labels_frame(ids, labels, calendar.cutoff))
        su, ss, se, st = scenes
        scene_frames.append(pd.DataFrame({"user_id": ids[su], "start": _utc(ss).to_pandas(), "end": _utc(se).to_pandas(), "text": st}))
    labels = pd.concat(label_frames, ignore_index=True)
    scenarios = pd.concat(scene_frames, ignore_index=True)
    _write_frame(catalog.table, out / "behaviors.parquet")
    _write_frame(population.users_table(user_ids, tier_at_cutoff, catalog.region_names), out / "users.parquet")
    _write_frame(labels, out / "labels.parquet")
    _write_frame(scenarios, out / "scenarios.parquet")
    DatasetManifest(
        name=cfg.name,
        timezone=cfg.timezone,
        description=(
            f"Synthetic telecom operator: {cfg.users} users x {cfg.days} days from {cfg.start_date} "
            f"({cfg.timezone}); labels describe the {cfg.label_horizon_days} days after the window, "
            "their time is the end of the window."
        ),
        provenance={"generator": f"{__name__}.simulate", "config": dataclasses.asdict(cfg)},
    ).write(out)
    seconds = time.perf_counter() - started
    summary = {
        "out_dir": str(out),
        "users": cfg.users,
        "days": cfg.days,
        "events": num_events,
        "behaviors": catalog.num_behaviors,
        "shards": len(shards),
        "labels": len(labels),
        "scenarios": len(scenarios),
        "events_per_user_per_day": round(num_events / (cfg.users * cfg.days), 2),
        "label_rates": {t: round(float(labels.loc[labels.task == t, "label"].mean()), 4) for t in LABEL_TASKS},
        "seconds": round(seconds, 3),
        "events_per_second": round(num_events / max(seconds, 1e-9)),
    }
    log.info(
        "wrote %d events (%.1f per user-day) in %.1f s: %.0f events/s",
        num_events,
        summary["events_per_user_per_day"],
        seconds,
        summary["events_per_second"],
    )
    return summary


def bench_simulator(users: int = 10_000, days: int = 90, out_dir: str | Path | None = None) -> dict:
    """Time `simulate` with the bench config at `users` x `days` (into a temporary folder unless `out_dir`)."""

    cfg = load_config(SimulatorConfig, "pkg:synth/bench.yaml", {"users": users, "days": days})
    tmp = None if out_dir is not None else tempfile.mkdtemp(prefix="gts-lum-sim-bench-")
    try:
        summary = simulate(cfg, out_dir if out_dir is not None else tmp, progress=False)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    figures = {k: summary[k] for k in ("users", "days", "events", "shards", "events_per_user_per_day", "seconds", "events_per_second")}
    print("simulator bench:", figures)
    return figures
