-- ATT&CK techniques VirusTotal sandboxes report for the newest lookup of each file.
CREATE VIEW virustotal_techniques AS
SELECT t.observable, t.technique_id, t.technique_name, t.tactic_ids, t.sandbox,
       t.signature_descriptions, t.severity, t.fetched_at
FROM virustotal_technique_log t
JOIN virustotal_data d ON t.observable = d.observable AND t.batch_id = d.batch_id;
