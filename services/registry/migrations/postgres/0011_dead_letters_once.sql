-- A dead letter is kept once per consumer and event. A poll that failed after dead-lettering an event
-- (a crash, or the next dead letter's write failing) is delivered again, and its poison event fails
-- again: it is not counted twice. Copies kept before this key existed go, the first of each stays.
DELETE FROM dead_letters a USING dead_letters b
    WHERE a.consumer_group = b.consumer_group AND a.event_id = b.event_id AND a.id > b.id;
CREATE UNIQUE INDEX dead_letters_once ON dead_letters (consumer_group, event_id);
