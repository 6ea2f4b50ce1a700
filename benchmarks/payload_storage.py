"""How much the state store keeps per contact for the customer trace: the last payload sent, zlib-compressed.

    .venv/bin/python benchmarks/payload_storage.py        # 10,000 sandbox customers, both shipped mappings
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PROJECT / "plugins")]

from antavo_ometria.antavo import normalise_customer  # noqa: E402
from antavo_ometria.mapping import load_contact_mapping  # noqa: E402
from antavo_ometria.payload import encode_contacts  # noqa: E402
from antavo_ometria.sandbox.population import make_customer  # noqa: E402
from antavo_ometria.transform import customer_columns, transform  # noqa: E402


def main(count: int = 10_000) -> None:
    customers = [normalise_customer(make_customer(i)) for i in range(count)]
    for name, folder in (("shipped (legacy, 16 fields)", "include/mappings"),
                         ("v2 example (22 fields)", "include/mappings/examples/v2")):
        mapping = load_contact_mapping(PROJECT / folder)
        bodies = encode_contacts(transform(customer_columns(customers, mapping.loyalty_fields), mapping), mapping)
        raw = sum(map(len, bodies)) / count
        packed = sum(len(zlib.compress(body)) for body in bodies) / count
        print(f"{name}: {raw:.0f} bytes a record, {packed:.0f} compressed: {packed:.0f} MB per million contacts")


if __name__ == "__main__":
    main()
