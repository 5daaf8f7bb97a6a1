-- DataFusion function names the shipped views use that DuckDB spells differently; created as macros
-- in every embedded DuckDB session so sql/views/*.sql run unchanged on both engines.
CREATE MACRO array_element(l, i) AS list_extract(l, i);
-- DataFusion's text of a UTC timestamp (item versions are stored in that form): 2026-01-01T12:00:00Z,
-- with .mmm or .uuuuuu only when the time has a fraction.
CREATE MACRO threatlake_ts_text(ts) AS CASE
  WHEN ts IS NULL THEN NULL
  WHEN microsecond(ts) % 1000000 = 0 THEN strftime(ts, '%Y-%m-%dT%H:%M:%SZ')
  WHEN microsecond(ts) % 1000 = 0 THEN strftime(ts, '%Y-%m-%dT%H:%M:%S.%gZ')
  ELSE strftime(ts, '%Y-%m-%dT%H:%M:%S.%fZ')
END;
