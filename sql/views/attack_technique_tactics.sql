-- One row per (active technique, tactic) of the newest release per domain, with the tactic's name and matrix order.
CREATE VIEW attack_technique_tactics AS
SELECT te.domain, te.attack_version, te.technique_id, te.name AS technique_name, te.is_subtechnique,
       te.parent_id, ta.tactic_id, ta.shortname AS tactic, ta.name AS tactic_name, ta.matrix_order
FROM (
    SELECT domain, attack_version, technique_id, name, is_subtechnique, parent_id, unnest(tactics) AS tactic
    FROM attack_techniques_current
) te
JOIN attack_tactics_current ta
  ON ta.domain = te.domain AND ta.attack_version = te.attack_version AND ta.shortname = te.tactic;
