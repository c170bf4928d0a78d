-- A message's body chunks and destination index rows go with it, whatever
-- removes it (delivered, deleted, expired), in the same statement: a
-- delivery's completion is one DELETE.
CREATE TRIGGER IF NOT EXISTS queue_messages_gone AFTER DELETE ON queue_messages
BEGIN
  DELETE FROM queue_bodies WHERE id = OLD.id;
  DELETE FROM queue_destinations WHERE id = OLD.id;
END;
