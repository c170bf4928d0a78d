-- One envelope codec for both queues: the `envelope` column holds the
-- string fields of a Redis message hash as one JSON object (see
-- src/spool/codec.rs), the operators' flags as "held" and "bounce" ("1").
-- Rows written before in the serde form (recipients as an array, flags as
-- booleans, `bounce_requested`) are converted; anything else (an
-- unreadable envelope) is left as it is.
UPDATE queue_messages SET envelope = json_object(
  'id', envelope ->> '$.id',
  'sender', envelope ->> '$.sender',
  'recipients', envelope ->> '$.recipients',
  'client_ip', envelope ->> '$.client_ip',
  'client_name', envelope ->> '$.client_name',
  'helo', envelope ->> '$.helo',
  'received_at', CAST(envelope ->> '$.received_at' AS TEXT),
  'size', CAST(envelope ->> '$.size' AS TEXT),
  'node', envelope ->> '$.node',
  'smtputf8', CASE WHEN envelope ->> '$.smtputf8' THEN '1' ELSE '0' END,
  'eight_bit', CASE WHEN envelope ->> '$.eight_bit' THEN '1' ELSE '0' END,
  'attempts', CAST(envelope ->> '$.attempts' AS TEXT),
  'held', CASE WHEN envelope ->> '$.held' THEN '1' ELSE '0' END,
  'bounce', CASE WHEN envelope ->> '$.bounce_requested' THEN '1' ELSE '0' END)
WHERE json_valid(envelope) AND json_type(envelope, '$.recipients') = 'array';
