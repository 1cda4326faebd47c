-- A dead letter is kept once per consumer and event. A poll that failed after dead-lettering an event
-- (a crash, or the next dead letter's write failing) is delivered again, and its poison event fails
-- again: it is not counted twice. Copies kept before this key existed go, the first of each stays.
DELETE FROM dead_letters WHERE id NOT IN (SELECT MIN(id) FROM dead_letters GROUP BY consumer_group, event_id);
CREATE UNIQUE INDEX dead_letters_once ON dead_letters (consumer_group, event_id);
