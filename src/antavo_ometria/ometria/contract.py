"""Ometria's documented contract, in one place: every limit, pattern and value set the sync relies on.

Sources: Ometria's push API, contact and custom event documentation (see the project's API reference
notes). Everything else reads these names; nothing restates them. The local sandbox keeps its own copy,
written from the same documentation, so that it can catch a wrong rule here.
"""

from __future__ import annotations

from datetime import timedelta
from functools import cache
from importlib import resources

# -- the push API ------------------------------------------------------------------------------
DEFAULT_BASE_URL = "https://api.ometria.com"
PUSH_PATH = "/v2/push"
ERRORS_PATH = "/v2/push/_errors"  # the asynchronous validation errors
LISTS_PATH = "/v2/lists"
MAX_BATCH_RECORDS = 100  # records per request, all of one type
# "60KB" per record (https://docs.ometria.com/docs/ometria-data-api-introduction and
# https://support.ometria.com/hc/en-gb/articles/360011511017-Data-API-introduction), which kilobyte not said:
# the decimal one is the smaller, so a record sent fits either reading. The sandbox takes the larger (60 * 1024).
MAX_RECORD_BYTES = 60_000
RECORD_TYPES = ("contact", "order", "product", "custom_event")
# a contact pushed again with the same id is merged (upsert); whether a custom event pushed again with the same id is
# deduplicated or starts its automation again is not documented: a push of one whose answer was lost is not repeated
# at once
REPEAT_UNDOCUMENTED = ("custom_event",)
DEFAULT_REQUESTS_PER_SECOND = 4.0  # the account-wide rate limit; 429 when over it or when the queue is full

# -- values ------------------------------------------------------------------------------------
MAX_EXACT_NUMBER = 2**53 - 1  # the largest whole number a JSON number (an IEEE 754 double) carries exactly
# local part without spaces; a host name of letter-or-digit labels (hyphens inside), ending in a label of letters
EMAIL = r"^[^@\s]+@(?:[^\W_](?:(?:[^\W_]|-)*[^\W_])?\.)+[^\W\d_]{2,}$"
PHONE_E164 = r"^\+[1-9]\d{6,14}$"
GENDERS = ("m", "f")
OPTIN = ("EXPLICITLY_OPTEDIN", "EXPLICITLY_OPTEDOUT", "NOT_SPECIFIED")  # marketing_optin
ISO_DATETIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[+-]\d{2}:\d{2}|Z)$"
# YYYY-MM-DD that exists in the calendar (month lengths and leap years), as one regular expression
CALENDAR_DATE = (r"^(?:\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
                 r"|02-(?:0[1-9]|1\d|2[0-8]))|\d{2}(?:0[48]|[2468][048]|[13579][26])-02-29"
                 r"|(?:[02468][048]|[13579][26])00-02-29)$")
CONTROL_CHARACTERS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # no text field may carry them
CUSTOM_FIELD_ID = r"^[A-Za-z0-9_-]+$"  # a custom field's ID has no spaces (e.g. loyalty_tier)

# -- custom events -----------------------------------------------------------------------------
MAX_EVENT_TYPE = 31  # event types must be shorter than 32 characters
MAX_STRING_PROPERTY = 512  # characters kept of a string property
LATE_AFTER = timedelta(hours=4)  # an older event cannot start an automation
STAGGER_AT = 1000  # more events than this on one timestamp are spread out …
STAGGER_STEP = timedelta(minutes=5)  # … in steps of this


@cache
def iso_countries() -> frozenset[str]:
    """ISO 3166-1 alpha-2 codes: what `country_id` takes."""
    text = resources.files("antavo_ometria").joinpath("data", "iso3166_alpha2.txt").read_text()
    return frozenset(line for line in text.split() if len(line) == 2)


def kilobytes(size: int) -> str:
    """A size as Ometria's documentation writes it: decimal kilobytes (60,000 bytes → "60 KB")."""
    return f"{size / 1000:g} KB"


def hours(span: timedelta) -> str:
    return f"{span.total_seconds() / 3600:g} hours"
