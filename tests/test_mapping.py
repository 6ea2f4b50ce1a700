"""The mapping table and settings: one test per class of mistake, each with file, line and column."""

from __future__ import annotations

from pathlib import Path

import pytest

from antavo_ometria.problems import ConfigError
from antavo_ometria.sync.tables.mapping import find_in_catalog, load_contact_mapping
from antavo_ometria.sync.tables.settings import SETTINGS, settings_table

HEADER = "loyalty_field,remote_field,format,overwrite_empty\n"


def problems_for(mappings: Path, table: str | bytes, settings: str | None = None) -> list[str]:
    path = mappings / "contacts.csv"
    path.write_bytes(table if isinstance(table, bytes) else table.encode())
    if settings is not None:
        (mappings / "settings.toml").write_text(settings)
    with pytest.raises(ConfigError) as raised:
        load_contact_mapping(mappings)
    return [str(p) for p in raised.value.problems]


def test_shipped_mappings_are_valid():
    root = Path(__file__).resolve().parents[1] / "include" / "mappings"
    legacy = load_contact_mapping(root)
    v2 = load_contact_mapping(root / "examples" / "v2")
    assert legacy.settings.payload_mode == "legacy" and len(legacy.fields) >= 10
    assert v2.settings.payload_mode == "v2" and len(v2.fields) >= 20
    assert legacy.version != v2.version


def test_catalog_wildcards():
    assert find_in_catalog("tiers.basic_structure.next.name").module == "Tiers"
    assert find_in_catalog("accounts.prestige_balance.earned").module == "Multi-accounts"
    assert find_in_catalog("extensions.expiring_points.total").module == "Expiring points"
    assert find_in_catalog("properties.shoe_size").module == "custom properties"
    assert find_in_catalog("tiers.basic_structure") is None


def test_make_fields_offers_the_expiring_points_total_and_says_why_nothing_else(capsys):
    from antavo_ometria_tools.cli import main

    assert main(["fields"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines if line.startswith("extensions.")] == ["extensions.expiring_points.total"]
    note = next(line for line in lines if "fields=expiring_points" in line)
    assert note.startswith("Only extensions.expiring_points.total is offered for expiring points")
    assert '"a summary of expiration statistics", without naming the fields in it' in note
    assert "fields=expiring_points.history as a list of dates and points" in note


def test_an_expiring_points_field_antavo_does_not_name_is_refused_with_the_reason(mappings):
    found = problems_for(mappings, HEADER + "email,email,,\nextensions.expiring_points.next_date,expiry,,\n",
                         (mappings / "settings.toml").read_text().replace('"legacy"', '"v2"'))
    assert len(found) == 1 and found[0].startswith(
        f"{mappings}/contacts.csv:3: [loyalty_field] unknown loyalty field 'extensions.expiring_points.next_date' "
        "(did you mean 'extensions.expiring_points.total'?); only extensions.expiring_points.total is offered")
    assert "a summary of expiration statistics" in found[0]


def test_the_sandbox_serves_expiring_points_with_only_the_fields_the_catalog_offers(antavo_client):
    from antavo_ometria.sync.tables.mapping import catalog

    offered = {f.path.rpartition(".")[2] for f in catalog() if f.path.startswith("extensions.expiring_points.")}
    read_api = antavo_client.read_sample(100)  # the Read API's customer entity
    assert {key for c in read_api for key in c["extensions"]["expiring_points"]} == offered == {"total"}
    plain, asked = (antavo_client.get_customers(["c00000001"], paths)[0]
                    for paths in ([], ["extensions.expiring_points.total"]))
    assert "extensions" not in plain and "expiring_points" not in plain  # a classic profile: only when asked for
    assert set(asked["extensions"]["expiring_points"]) == offered
    assert asked["extensions"] == read_api[1]["extensions"]


def test_unknown_loyalty_field_suggests_the_closest(mappings):
    found = problems_for(mappings, HEADER + "email,email,,\nfirst_nmae,firstname,,\n")
    assert found == [f"{mappings}/contacts.csv:3: [loyalty_field] unknown loyalty field 'first_nmae' "
                     "(did you mean 'first_name'?); `make fields` lists the loyalty fields"]


def test_a_custom_field_id_close_to_a_builtin_is_a_warning_not_a_stop(mappings):
    (mappings / "contacts.csv").write_text(HEADER + "email,email,,\nlast_name,lastnme,,\n")
    mapping = load_contact_mapping(mappings)
    assert [f.remote_field for f in mapping.fields] == ["email", "lastnme"]
    assert [str(w) for w in mapping.warnings] == [
        f"{mappings}/contacts.csv:3: [remote_field] 'lastnme' is sent as a custom field ID; if you meant Ometria's "
        "built-in field 'lastname', fix the spelling"]


@pytest.mark.parametrize("field_id", ["customer_tier", "store_id", "middle_name", "date_of_birth2", "tier-name"])
def test_every_valid_ometria_field_id_can_be_mapped(mappings, field_id):
    (mappings / "contacts.csv").write_text(HEADER + f"email,email,,\nproperties.city,{field_id},,\n")
    assert load_contact_mapping(mappings).fields[1].remote_field == field_id


def test_loyalty_fields_written_as_antavo_writes_them(mappings):
    (mappings / "settings.toml").write_text('[ometria]\npayload_mode = "v2"\n')
    (mappings / "contacts.csv").write_text(HEADER + "email,email,,\ncustomer.tiers.basic_structure.name,loyalty_tier,,\n"
                                           "customer.accounts.prestige.spendable,prestige_balance,,\n")
    fields = load_contact_mapping(mappings).fields
    assert [f.loyalty_field for f in fields] == ["email", "tiers.basic_structure.name", "accounts.prestige.spendable"]


def test_saving_the_same_mapping_differently_keeps_its_version(mappings):
    table, settings = (mappings / "contacts.csv").read_text(), (mappings / "settings.toml").read_text()
    first = load_contact_mapping(mappings).version
    (mappings / "contacts.csv").write_bytes(b"\xef\xbb\xbf" + table.replace("\n", "\r\n").encode())  # Excel
    (mappings / "settings.toml").write_text("# edited by hand\n" + settings.replace("# Ometria list", "# the list"))
    assert load_contact_mapping(mappings).version == first
    (mappings / "contacts.csv").write_text(table.replace("first_name,firstname", "handler,firstname"))
    assert load_contact_mapping(mappings).version != first


@pytest.mark.parametrize("saved_as", ["semicolons", "tabs", "unicode text"])
def test_a_table_excel_saved_with_semicolons_or_tabs_is_the_same_mapping(mappings, saved_as):
    table = (mappings / "contacts.csv").read_text()
    first = load_contact_mapping(mappings)
    separator = ";" if saved_as == "semicolons" else "\t"
    excel = table.replace(",", separator).replace("\n", "\r\n")
    raw = (b"\xef\xbb\xbf" + excel.encode()) if saved_as != "unicode text" else excel.encode("utf-16")  # with its BOM
    (mappings / "contacts.csv").write_bytes(raw)
    again = load_contact_mapping(mappings)
    assert again.version == first.version and again.fields == first.fields


def test_a_semicolon_table_keeps_a_quoted_cell_and_reports_a_short_row(mappings):
    found = problems_for(mappings, b"\xef\xbb\xbfloyalty_field;remote_field;format;overwrite_empty\r\n"
                                   b"email;email;;\r\n\"first_nmae\";firstname;;\r\nlast_name;lastname\r\n")
    assert found == [f"{mappings}/contacts.csv:3: [loyalty_field] unknown loyalty field 'first_nmae' (did you mean "
                     "'first_name'?); `make fields` lists the loyalty fields",
                     f"{mappings}/contacts.csv:4: the row has 2 cells, the header 4"]


def test_a_trigger_table_saved_with_semicolons_is_accepted(mappings):
    from antavo_ometria.sync.events.rules import load_rules

    comma = load_rules(mappings)
    triggers = mappings / "triggers.csv"
    triggers.write_bytes(b"\xef\xbb\xbf" + triggers.read_text().replace(",", ";").replace("\n", "\r\n").encode())
    assert load_rules(mappings) == comma


def test_an_unterminated_quote_is_reported_where_it_opens(mappings):
    found = problems_for(mappings, HEADER + 'email,email,,\n"first_name,firstname,,\nlast_name,lastname,,\n')
    assert found[0] == (f"{mappings}/contacts.csv:3: a quote (\") opened on line 3 is not closed before line 4; "
                        "close it or remove it")


def test_malformed_custom_field_id(mappings):
    found = problems_for(mappings, HEADER + "email,email,,\nproperties.city,home city,,\n")
    assert ":3: [remote_field] 'home city' is not a valid custom field ID" in found[0]


def test_same_remote_field_twice(mappings):
    found = problems_for(mappings, HEADER + "email,email,,\nfirst_name,firstname,,\nhandler,firstname,,\n")
    assert found == [f"{mappings}/contacts.csv:4: [remote_field] 'firstname' is already mapped on line 3; "
                     "map each remote field once"]


def test_no_email_mapping(mappings):
    found = problems_for(mappings, HEADER + "first_name,firstname,,\n")
    assert "no row maps to 'email'" in found[0]


def test_v2_only_field_in_legacy_mode(mappings):
    found = problems_for(mappings, HEADER + "email,email,,\ntiers.basic_structure.name,loyalty_tier,,\n")
    assert ":3: [loyalty_field] 'tiers.basic_structure.name' comes from the Tiers module and is only " \
           "available in v2 mode" in found[0]


def test_v2_only_field_is_fine_in_v2_mode(mappings):
    (mappings / "settings.toml").write_text('[ometria]\npayload_mode = "v2"\n')
    (mappings / "contacts.csv").write_text(HEADER + "email,email,,\ntiers.basic_structure.name,loyalty_tier,,\n")
    assert load_contact_mapping(mappings).fields[1].remote_field == "loyalty_tier"


def test_empty_cells(mappings):
    found = problems_for(mappings, HEADER + "email,email,,\n,firstname,,\nlast_name,,,\n")
    assert any(":3: [loyalty_field] loyalty_field is empty" in p for p in found)
    assert any(":4: [remote_field] remote_field is empty" in p for p in found)


def test_wrong_header(mappings):
    found = problems_for(mappings, "loyalty_feild,remote_field\nemail,email\n")
    assert any(":1: [loyalty_feild] unknown column 'loyalty_feild' (did you mean 'loyalty_field'?)" in p for p in found)
    assert any("the header has no 'loyalty_field' column" in p for p in found)


def test_a_byte_order_mark_is_accepted(mappings):
    (mappings / "contacts.csv").write_bytes(b"\xef\xbb\xbf" + (HEADER + "email,email,,\n").encode())
    assert load_contact_mapping(mappings).fields[0].loyalty_field == "email"


def test_odd_encoding(mappings):
    found = problems_for(mappings, (HEADER + "email,email,,\nproperties.café,cafe,,\n").encode("latin-1"))
    assert ":3: byte 0xe9 is not UTF-8" in found[0]


def test_format_that_does_not_fit(mappings):
    found = problems_for(mappings, HEADER + "email,email,date,\nlabels,tags,number,\nscore,points,gender,\n")
    assert any(":2: [format] email is always written as email; leave format empty" in p for p in found)
    assert any(":3: [format] 'labels' holds a list and cannot be written as number" in p for p in found)
    assert any(":4: [format] custom fields take one of" in p for p in found)


def test_id_and_consent_rows(mappings):
    found = problems_for(mappings, HEADER + "email,email,,\nid,id,,\nproperties.newsletter,marketing_optin,,\n"
                         "properties.sms_ok,channels.sms.allow_marketing,,\n")
    assert any(":3: [remote_field] 'id' is set by the sync itself" in p for p in found)
    assert any(':4: [remote_field] marketing_optin is consent, and [consent] mode in settings.toml is "never": '
               'set mode = "preference"' in p for p in found)
    assert any(":5: [remote_field] channels.sms.allow_marketing is consent" in p for p in found)


@pytest.mark.parametrize("mode, forced", [("preference", False), ("authoritative", True)])
def test_consent_rows_are_sent_in_the_modes_that_send_consent(mappings, mode, forced):
    (mappings / "settings.toml").write_text(f'[consent]\nmode = "{mode}"\n')
    (mappings / "contacts.csv").write_text(HEADER + "email,email,,\nproperties.newsletter,marketing_optin,,\n"
                                           "properties.sms_ok,channels.sms.allow_marketing,,\n")
    mapping = load_contact_mapping(mappings)
    assert [f.format for f in mapping.fields[1:]] == ["optin", "boolean"]
    assert mapping.shape.force_optin is forced and mapping.warnings == ()


def test_the_earlier_consent_setting_keeps_its_meaning_and_says_how_to_write_it(mappings):
    table = HEADER + "email,email,,\nproperties.newsletter,marketing_optin,,\n"
    (mappings / "contacts.csv").write_text(table)
    (mappings / "settings.toml").write_text("[consent]\nauthoritative = true\n")
    earlier = load_contact_mapping(mappings)
    assert earlier.settings.consent_mode == "preference" and not earlier.shape.force_optin
    assert [str(w) for w in earlier.warnings] == [
        f'{mappings}/settings.toml:2: [authoritative] authoritative = true is read as mode = "preference"; write '
        'that instead (mode = "authoritative" also forces Antavo\'s marketing_optin over opt-outs from other sources)']
    (mappings / "settings.toml").write_text('[consent]\nmode = "preference"\n')
    assert load_contact_mapping(mappings).version == earlier.version  # no re-send for writing it the new way
    (mappings / "settings.toml").write_text('[consent]\nmode = "authoritative"\n')
    assert load_contact_mapping(mappings).version != earlier.version  # forcing changes every payload
    found = problems_for(mappings, table, settings='[consent]\nmode = "preference"\nauthoritative = true\n')
    assert found == [f"{mappings}/settings.toml:3: [authoritative] set either [consent] mode or the earlier "
                     "authoritative, not both; keep mode"]
    found = problems_for(mappings, table, settings='[consent]\nmode = "always"\n')
    assert found == [f"{mappings}/settings.toml:2: [mode] consent mode must be one of ('never', 'preference', "
                     "'authoritative'), not 'always'"]


def test_authoritative_consent_without_a_consent_row_is_a_warning(mappings):
    (mappings / "settings.toml").write_text('[consent]\nmode = "authoritative"\n')
    (mappings / "contacts.csv").write_text(HEADER + "email,email,,\n")
    assert [w.message for w in load_contact_mapping(mappings).warnings] == [
        'consent mode "authoritative" forces marketing_optin, but no row maps to it: nothing is forced']


def test_every_problem_is_reported_at_once(mappings):
    found = problems_for(mappings, HEADER + "first_nmae,firstname,,\nlast_name,lastnme,,\nfoo,bar,,maybe\n",
                         settings='[ometria]\npayload_mode = "v3"\ncolour = "red"\n')
    assert len(found) == 6  # 2 in settings, 3 in three rows (lastnme is only a warning), and no email mapping
    assert any("settings.toml:2: [payload_mode]" in p for p in found)
    assert any("settings.toml:3: [colour] unknown setting ometria.colour" in p for p in found)


def test_settings_types_and_values(mappings):
    found = problems_for(mappings, HEADER + "email,email,,\n",
                         settings='[ometria]\nlist_id = "my list"\n[quality]\nmax_invalid_share = 2\n')
    assert any("[list_id] list_id must be the numeric ID" in p for p in found)
    assert any("[max_invalid_share] max_invalid_share must be between 0 and 1" in p for p in found)


def test_a_bad_setting_is_reported_alone_not_with_the_rows_judged_by_its_default(tmp_path):
    v2 = Path(__file__).resolve().parents[1] / "include" / "mappings" / "examples" / "v2"
    for source in v2.glob("*.*"):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    settings = (tmp_path / "settings.toml").read_text()
    (tmp_path / "settings.toml").write_text(settings.replace('list_id = "8400"', 'list_id = "Loyalty members"'))
    found = problems_for(tmp_path, (tmp_path / "contacts.csv").read_bytes())
    assert len(found) == 1 and "[list_id] list_id must be the numeric ID of an Ometria list" in found[0]
    assert "'Loyalty members'" in found[0]
    # a payload mode that is wrong itself cannot make v2 rows wrong, and a row's own problem still shows
    (tmp_path / "settings.toml").write_text(settings.replace('payload_mode = "v2"', 'payload_mode = "v3"'))
    table = (tmp_path / "contacts.csv").read_text() + "first_nmae,nickname,,\n"
    found = problems_for(tmp_path, table)
    assert len(found) == 2, found
    assert "[payload_mode] payload_mode must be one of" in found[0] and "unknown loyalty field 'first_nmae'" in found[1]


def test_the_readme_settings_table_is_the_one_the_settings_declare():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Settings (`include/mappings/settings.toml`)\n\n", 1)[1]
    table = section[:section.index("\n\n") + 1]
    assert table == settings_table(), "replace the README's settings table with:\n" + settings_table()


def test_every_setting_s_default_has_its_type_and_keeps_its_rule():
    wrong = [s.name for s in SETTINGS if not s.has_type(s.default) or s.broken_rule(s.default) is not None]
    assert not wrong


def test_consent_rows_are_not_judged_by_a_consent_setting_of_the_wrong_type(mappings):
    found = problems_for(mappings, HEADER + "email,email,,\nproperties.newsletter,marketing_optin,,\n",
                         settings='[consent]\nauthoritative = "yes"\n')
    assert len(found) == 1 and "consent.authoritative has the wrong type ('yes'); write mode = one of" in found[0]


def test_version_changes_with_either_file(mappings):
    first = load_contact_mapping(mappings).version
    (mappings / "settings.toml").write_text((mappings / "settings.toml").read_text().replace('"en"', '"de"'))
    second = load_contact_mapping(mappings).version
    with (mappings / "contacts.csv").open("a") as handle:
        handle.write("handler,nickname,,\n")
    assert len({first, second, load_contact_mapping(mappings).version}) == 3


def test_validate_command_reports_every_file(mappings, capsys):
    from antavo_ometria.sync.events.rules import load_rules
    from antavo_ometria_tools.cli import main

    assert main(["validate", "--mappings", str(mappings)]) == 0
    assert f"{len(load_rules(mappings))} event trigger rule(s)" in capsys.readouterr().out
    (mappings / "contacts.csv").write_text(HEADER + "email,email,,\nfirst_nmae,firstname,,\n")
    (mappings / "triggers.csv").write_text("rule,antavo_action,ometria_event_type,property,source\n"
                                          "claimed,reward,claimed,name,reward.colour\n")
    assert main(["validate", "--mappings", str(mappings)]) == 1
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "contacts.csv:3" in err and "triggers.csv:2" in err


def test_validate_shows_the_warnings_together_with_the_errors(mappings, capsys):
    from antavo_ometria_tools.cli import main

    (mappings / "contacts.csv").write_text(HEADER + "email,email,,\ngender,gendre,,\nfirst_nmae,firstname,,\n")
    assert main(["validate", "--mappings", str(mappings)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "1 problem(s) in the sync configuration, and 1 warning(s):"
    assert err[1].startswith(f"  {mappings}/contacts.csv:4: [loyalty_field] unknown loyalty field 'first_nmae'")
    assert err[2] == (f"  warning: {mappings}/contacts.csv:3: [remote_field] 'gendre' is sent as a custom field ID; "
                      "if you meant Ometria's built-in field 'gender', fix the spelling")


def test_diff_says_that_removing_a_row_does_not_clear_ometria(mappings):
    from antavo_ometria_tools.population import make_population
    from antavo_ometria_tools.preview import render_diff

    before = load_contact_mapping(mappings)
    table = mappings / "contacts.csv"
    table.write_text("".join(line for line in table.read_text().splitlines(keepends=True) if ",city," not in line))
    text = render_diff(make_population(5), before, load_contact_mapping(mappings))
    assert "Removing a row stops sending city, but does not clear what Ometria already holds" in text
    assert "overwrite_empty = yes" in text


def test_diff_shows_a_format_change_column_by_column_with_the_same_customers_before_and_after(mappings, tmp_path,
                                                                                               capsys):
    from antavo_ometria_tools.cli import main

    before = tmp_path / "before"
    before.mkdir()
    for name in ("contacts.csv", "settings.toml"):
        (before / name).write_bytes((mappings / name).read_bytes())
    table = mappings / "contacts.csv"
    table.write_text(table.read_text().replace("purchase_count,purchase_count,integer,",
                                               "purchase_count,purchase_count,string,")
                     .replace("properties.newsletter,newsletter,boolean,no", "properties.newsletter,newsletter,boolean,yes"))
    assert main(["diff", "--before", str(before), "--after", str(mappings), "-n", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("  ~ row purchase_count (line 14): format integer → string")
    counted = lines[at + 1].strip()
    assert counted.endswith("of 20 sample customers get another value (old mapping → new):")
    samples = lines[at + 2: at + 5]
    assert len(samples) == 3
    for sample in samples:  # one customer's count as the old mapping sends it, then as the new one does
        cid, _, values = sample.strip().partition(": ")
        old, _, new = values.partition(" → ")
        assert cid.startswith("c") and old.isdigit() and new == f'"{old}"', sample
    assert "  ~ row newsletter (line 17): overwrite_empty no → yes" in lines
    assert not any(line.startswith(("  - row", "  + row")) for line in lines)  # changed, not removed and added


def test_a_trigger_table_saved_with_a_byte_order_mark_is_accepted(mappings):
    from antavo_ometria.sync.events.rules import load_rules

    plain = load_rules(mappings)
    rules = mappings / "triggers.csv"
    rules.write_bytes(b"\xef\xbb\xbf" + rules.read_bytes())
    assert load_rules(mappings) == plain and "reward_claimed" in [r.name for r in plain]


def test_a_quality_threshold_is_no_mapping_change_and_an_upgrade_keeps_the_version(mappings):
    first = load_contact_mapping(mappings)
    settings = mappings / "settings.toml"
    settings.write_text(settings.read_text().replace("max_invalid_share = 0.05", "max_invalid_share = 0.2")
                        .replace("overlap_minutes = 10", "overlap_minutes = 30"))
    assert load_contact_mapping(mappings).version == first.version
    # a copy of the shipped tables, the same content runs recorded under a hash of the files' bytes had
    as_shipped = load_contact_mapping(Path(__file__).resolve().parent / "golden" / "mappings" / "legacy")
    assert as_shipped.is_version("7ea83d3e5a85")  # what those runs recorded: no re-send on upgrade


def test_the_mappings_are_found_beside_the_dags_folder_when_the_package_is_installed(tmp_path, monkeypatch):
    from antavo_ometria.sync.tables.settings import mappings_dir

    (tmp_path / "include" / "mappings").mkdir(parents=True)
    monkeypatch.delenv("ANTAVO_OMETRIA_MAPPINGS_DIR", raising=False)
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(tmp_path / "dags"))
    assert mappings_dir() == tmp_path / "include" / "mappings"
    monkeypatch.setenv("ANTAVO_OMETRIA_MAPPINGS_DIR", str(tmp_path / "elsewhere"))
    assert mappings_dir() == tmp_path / "elsewhere"
