-- This bank's cards as the adapter came to know them: from its own account opening (ConfirmAccountOpening)
-- or from a registry lookup. A card's number and its bank never change, so once a card is here an
-- activation, a loss report or an unlock resolves the number without asking the registry; and the
-- activation of a known card is recorded (and its event finishes it) even while the registry is out of reach.
CREATE TABLE bank_cards (
    card_number TEXT PRIMARY KEY,
    card_id     TEXT NOT NULL UNIQUE,
    learned_at  INTEGER NOT NULL
);
