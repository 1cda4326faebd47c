//! Client subcommands: a demo (and a clerk's quick tool) over the registry's gRPC API. Each mutating
//! command sends a fresh idempotency key unless one is given, so a retried command is safe to repeat
//! with `--idempotency-key`.

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use socialcard_domain::bank::SHANGHAI_BANK_FILES;
use socialcard_domain::numbers::luhn_check_digit;
use socialcard_domain::{BankDirectory, CardNumber};
use socialcard_proto::bank::v1 as bank_pb;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::loss::v1 as loss_pb;
use socialcard_proto::loss::v1::loss_coordinator_service_client::LossCoordinatorServiceClient;
use socialcard_proto::registry::v1 as pb;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use tonic::transport::Channel;

#[derive(Debug, Args)]
pub struct Connection {
    /// The registry's gRPC endpoint.
    #[arg(long, global = true, env = "SOCIALCARD_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    pub(crate) endpoint: String,
    /// Mutual TLS with the certificates in this directory (`socialcard certs --out <dir>`): `up` serves
    /// with them, the client commands present them (the CLI's service certificate to the registry, the
    /// card's bank certificate to a bank adapter).
    #[arg(long, global = true, env = "SOCIALCARD_TLS_DIR")]
    pub(crate) tls_dir: Option<std::path::PathBuf>,
    /// Idempotency key for the call; default: a new one.
    #[arg(long, global = true)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ActivationChannel {
    /// Community service point, holder in person with ID card and card.
    CommunityPoint,
    /// Bureau window, holder in person.
    BureauWindow,
    /// Online with a face-verification reference.
    Online,
    /// Hotline from the registered phone (give --phone).
    Hotline,
    /// Financial activation at the card's bank branch, which switches the social function on too (R20).
    Bank,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Loss {
    /// By phone (hotline).
    Temporary,
    /// In writing at a bureau window.
    Written,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Register a person (18-digit citizen ID).
    Register {
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        phone: String,
    },
    /// Apply for a card at a community service point.
    Apply {
        #[arg(long)]
        id: String,
        /// Partner bank code (icbc, abc, boc, ccb, bocom, spdb, bosc, srcb, psbc, cmb, citic).
        #[arg(long)]
        bank: String,
        #[arg(long, default_value = "point-001")]
        backup_point: String,
        #[arg(long, default_value = "1 Renmin Road")]
        address: String,
    },
    /// Approve an application.
    Approve { card_id: String },
    /// Send to production and record success with an account at the card's bank.
    Produce { card_id: String },
    /// Record that the holder picked the card up at the community point.
    Collect { card_id: String },
    /// Activate: the social function alone, or both through the bank (R19, R20).
    Activate {
        card_id: String,
        #[arg(long, value_enum, default_value = "community-point")]
        channel: ActivationChannel,
        /// Calling number for the hotline channel.
        #[arg(long)]
        phone: Option<String>,
        /// The card's bank adapter (channel bank); default: the port of the bank's file on 127.0.0.1.
        #[arg(long)]
        bank_endpoint: Option<String>,
    },
    /// Report a loss to the loss coordinator: the social function is locked and the financial one frozen.
    ReportLoss {
        card_id: String,
        #[arg(long, value_enum, default_value = "written")]
        kind: Loss,
        #[arg(long)]
        phone: Option<String>,
        /// The loss coordinator's gRPC endpoint.
        #[arg(long, env = "SOCIALCARD_LOSS_ENDPOINT", default_value = "http://127.0.0.1:50083")]
        loss_endpoint: String,
    },
    /// Unlock the social side of the card's loss case at a bureau window (the bank unlocks its side).
    Unlock {
        card_id: String,
        #[arg(long, env = "SOCIALCARD_LOSS_ENDPOINT", default_value = "http://127.0.0.1:50083")]
        loss_endpoint: String,
    },
    /// Show a card (by id or card number) and its audit trail.
    Show { card: String },
    /// Show a person and their cards.
    Person { id: String },
    /// Verify the audit trail's hash chains (every card, or one); exits non-zero when an entry was changed,
    /// removed or inserted behind the registry's back.
    AuditVerify {
        #[arg(long)]
        card: Option<String>,
    },
}

fn key(c: &Connection) -> String {
    c.idempotency_key.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

fn actor(channel: pb::Channel, site: &str) -> Option<pb::Actor> {
    Some(pb::Actor { channel: channel as i32, operator_id: "cli".into(), site_id: site.into(), ..Default::default() })
}

fn in_person() -> Option<pb::Documents> {
    Some(pb::Documents {
        presenter: pb::Presenter::Holder as i32,
        holder_id_card: true,
        card_presented: true,
        ..Default::default()
    })
}

/// An account number in the bank's first BIN range, derived from the card number (demo production).
fn demo_account(bank_code: &str, card_number: &str) -> anyhow::Result<String> {
    let banks = BankDirectory::shanghai();
    let bank = banks.get(bank_code).context("unknown bank")?;
    let prefix = bank.bin_prefixes.first().context("bank without BIN")?;
    let digits: String = card_number.chars().filter(char::is_ascii_digit).collect();
    let body = format!("{prefix}{:0>12}", digits);
    Ok(format!("{body}{}", luhn_check_digit(&body)))
}

/// `PHYSICAL_STATE_IN_PRODUCTION` -> `in production`.
fn label(enum_name: &str, prefix: &str) -> String {
    enum_name.strip_prefix(prefix).unwrap_or(enum_name).to_ascii_lowercase().replace('_', " ")
}

fn print_card(c: &pb::Card) {
    println!("card {}", c.card_id);
    println!("  holder            {}", c.citizen_id_masked);
    println!(
        "  type              {}",
        label(pb::CardType::try_from(c.card_type).map(|t| t.as_str_name()).unwrap_or("?"), "CARD_TYPE_")
    );
    println!("  bank              {}", c.bank_code);
    println!("  card number       {}", c.card_number);
    println!("  account           {}", c.account_number_masked);
    println!(
        "  physical          {}",
        label(pb::PhysicalState::try_from(c.physical_state).map(|s| s.as_str_name()).unwrap_or("?"), "PHYSICAL_STATE_")
    );
    println!(
        "  social function   {}",
        label(pb::SocialState::try_from(c.social_state).map(|s| s.as_str_name()).unwrap_or("?"), "SOCIAL_STATE_")
    );
    println!(
        "  financial         {}",
        label(
            pb::FinancialState::try_from(c.financial_state).map(|s| s.as_str_name()).unwrap_or("?"),
            "FINANCIAL_STATE_"
        )
    );
    println!("  status code       {}", c.status_code);
}

async fn coordinator(c: &Connection, endpoint: &str) -> anyhow::Result<LossCoordinatorServiceClient<Channel>> {
    let channel = crate::bank_tools::client_endpoint(c, endpoint, |t| t.service_client("cli"), "loss-coordinator")?
        .connect()
        .await
        .with_context(|| format!("cannot reach the loss coordinator at {endpoint}"))?;
    Ok(LossCoordinatorServiceClient::new(channel))
}

async fn current_card(client: &mut RegistryServiceClient<Channel>, card_id: &str) -> anyhow::Result<Option<pb::Card>> {
    Ok(client
        .get_card(pb::GetCardRequest { lookup: Some(pb::get_card_request::Lookup::CardId(card_id.to_string())) })
        .await
        .map_err(status_error)?
        .into_inner()
        .card)
}

fn print_case(c: &loss_pb::LossCase) {
    println!(
        "loss case {}: {} (social locked: {}, financial frozen: {}){}",
        c.case_id,
        label(loss_pb::CaseState::try_from(c.state).map(|s| s.as_str_name()).unwrap_or("?"), "CASE_STATE_"),
        c.social_locked,
        c.financial_frozen,
        if c.last_error.is_empty() { String::new() } else { format!("; retrying: {}", c.last_error) }
    );
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    let reason = socialcard_server::error::reason_of(&s).unwrap_or_default();
    anyhow::anyhow!("{:?} {}: {}", s.code(), reason, s.message())
}

pub async fn run(c: &Connection, action: Action) -> anyhow::Result<()> {
    let registry = crate::bank_tools::client_endpoint(c, &c.endpoint, |t| t.service_client("cli"), "registry")?;
    let mut client: RegistryServiceClient<Channel> = RegistryServiceClient::connect(registry)
        .await
        .with_context(|| format!("cannot reach the registry at {}", c.endpoint))?;
    let card = match action {
        Action::Register { id, name, phone } => {
            let r = client
                .register_person(pb::RegisterPersonRequest { idempotency_key: key(c), citizen_id: id, name, phone })
                .await
                .map_err(status_error)?
                .into_inner();
            let p = r.person.unwrap_or_default();
            println!("registered {} {} born {}", p.citizen_id_masked, p.name, p.birth_date);
            return Ok(());
        }
        Action::Apply { id, bank, backup_point, address } => {
            let req = pb::SubmitApplicationRequest {
                idempotency_key: key(c),
                citizen_id: id,
                actor: actor(pb::Channel::CommunityPoint, &backup_point),
                documents: Some(pb::Documents {
                    presenter: pb::Presenter::Holder as i32,
                    holder_id_card: true,
                    ..Default::default()
                }),
                card_type: pb::CardType::Adult as i32,
                holder_status: pb::HolderStatus::Unemployed as i32,
                bank_code: bank,
                photo: Some(pb::Photo { source: pb::PhotoSource::CommunityPoint as i32, ..Default::default() }),
                delivery_address: Some(pb::Address { line: address, ..Default::default() }),
                backup_point_id: backup_point,
                ..Default::default()
            };
            client.submit_application(req).await.map_err(status_error)?.into_inner().card
        }
        Action::Approve { card_id } => {
            client
                .review_application(pb::ReviewApplicationRequest {
                    idempotency_key: key(c),
                    card_id,
                    actor: actor(pb::Channel::BureauWindow, "bureau"),
                    decision: pb::ReviewDecision::Approve as i32,
                    reason: String::new(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .card
        }
        Action::Produce { card_id } => {
            let k = key(c);
            let started = client
                .start_production(pb::StartProductionRequest {
                    idempotency_key: format!("{k}-start"),
                    card_id: card_id.clone(),
                    actor: actor(pb::Channel::Production, "factory"),
                    batch_id: "cli".into(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .card
                .unwrap_or_default();
            let account = demo_account(&started.bank_code, &started.card_number)?;
            client
                .record_production_result(pb::RecordProductionResultRequest {
                    idempotency_key: format!("{k}-result"),
                    card_id,
                    actor: actor(pb::Channel::Production, "factory"),
                    result: Some(pb::record_production_result_request::Result::AccountNumber(account)),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .card
        }
        Action::Collect { card_id } => {
            client
                .record_collection(pb::RecordCollectionRequest {
                    idempotency_key: key(c),
                    card_id,
                    actor: actor(pb::Channel::CommunityPoint, "point-001"),
                    method: pb::CollectionMethod::PickedUpAtPoint as i32,
                    collected_at: None,
                    documents: in_person(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .card
        }
        Action::Activate { card_id, channel, phone, bank_endpoint } => {
            if let ActivationChannel::Bank = channel {
                // As a bank's core system does it: through the card's own bank adapter (R20).
                let current = client
                    .get_card(pb::GetCardRequest {
                        lookup: Some(pb::get_card_request::Lookup::CardId(card_id.clone())),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .card
                    .unwrap_or_default();
                let endpoint = match bank_endpoint {
                    Some(e) => e,
                    None => {
                        let (_, ports) =
                            BankDirectory::from_files(&SHANGHAI_BANK_FILES).map_err(|r| anyhow::anyhow!("{r}"))?;
                        let port = ports
                            .iter()
                            .find(|(c, _)| *c == current.bank_code)
                            .and_then(|(_, p)| *p)
                            .context("no port for the card's bank")?;
                        format!("http://127.0.0.1:{port}")
                    }
                };
                let bank_service = socialcard_server::tls::adapter_service_name(&current.bank_code);
                let bank_endpoint = crate::bank_tools::client_endpoint(
                    c,
                    &endpoint,
                    |t| t.bank_client(&current.bank_code),
                    &bank_service,
                )?;
                let mut bank = BankCardServiceClient::connect(bank_endpoint)
                    .await
                    .with_context(|| format!("cannot reach the bank adapter at {endpoint}"))?;
                let r = bank
                    .activate_financial(bank_pb::ActivateFinancialRequest {
                        idempotency_key: key(c),
                        card_number: current.card_number.clone(),
                        teller_id: "teller-cli".into(),
                        branch_id: "branch-001".into(),
                        face_verification_ref: "face-cli".into(),
                        bank_pin_changed: true,
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if r.social_awaits_bureau_unlock {
                    println!("financial function active; the social function awaits a bureau unlock (R22)");
                }
                client
                    .get_card(pb::GetCardRequest { lookup: Some(pb::get_card_request::Lookup::CardId(card_id)) })
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .card
            } else {
                let (ch, site) = match channel {
                    ActivationChannel::CommunityPoint => (pb::Channel::CommunityPoint, "point-001"),
                    ActivationChannel::BureauWindow => (pb::Channel::BureauWindow, "bureau"),
                    ActivationChannel::Online => (pb::Channel::Online, ""),
                    ActivationChannel::Hotline | ActivationChannel::Bank => (pb::Channel::Hotline, ""),
                };
                let mut a = actor(ch, site);
                if let Some(a) = a.as_mut() {
                    a.caller_phone = phone.unwrap_or_default();
                    a.verification_ref =
                        if matches!(channel, ActivationChannel::Online) { "face-cli".into() } else { String::new() };
                }
                client
                    .activate_social_function(pb::ActivateSocialFunctionRequest {
                        idempotency_key: key(c),
                        card_id,
                        actor: a,
                        documents: in_person(),
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .card
            }
        }
        Action::ReportLoss { card_id, kind, phone, loss_endpoint } => {
            let (loss_kind, a) = match kind {
                Loss::Temporary => {
                    let mut a = actor(pb::Channel::Hotline, "");
                    if let Some(a) = a.as_mut() {
                        a.caller_phone = phone.unwrap_or_default();
                    }
                    (pb::LossKind::Temporary, a)
                }
                Loss::Written => (pb::LossKind::Written, actor(pb::Channel::BureauWindow, "bureau")),
            };
            let documents = Some(pb::Documents {
                presenter: pb::Presenter::Holder as i32,
                holder_id_card: true,
                ..Default::default()
            });
            let case = coordinator(c, &loss_endpoint)
                .await?
                .report_loss(loss_pb::ReportLossRequest {
                    idempotency_key: key(c),
                    card_id: card_id.clone(),
                    card_number: String::new(),
                    actor: a,
                    documents,
                    loss_kind: loss_kind as i32,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .loss_case
                .unwrap_or_default();
            print_case(&case);
            current_card(&mut client, &card_id).await?
        }
        Action::Unlock { card_id, loss_endpoint } => {
            let case = coordinator(c, &loss_endpoint)
                .await?
                .unlock(loss_pb::UnlockRequest {
                    idempotency_key: key(c),
                    case_id: String::new(),
                    card_id: card_id.clone(),
                    actor: actor(pb::Channel::BureauWindow, "bureau"),
                    documents: in_person(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .loss_case
                .unwrap_or_default();
            print_case(&case);
            current_card(&mut client, &card_id).await?
        }
        Action::Show { card } => {
            let lookup = if CardNumber::parse(&card).is_ok() {
                pb::get_card_request::Lookup::CardNumber(card)
            } else {
                pb::get_card_request::Lookup::CardId(card)
            };
            let found = client
                .get_card(pb::GetCardRequest { lookup: Some(lookup) })
                .await
                .map_err(status_error)?
                .into_inner()
                .card
                .unwrap_or_default();
            print_card(&found);
            let trail = client
                .list_audit_trail(pb::ListAuditTrailRequest { card_id: found.card_id.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("  audit trail");
            for e in trail.entries {
                let channel = e
                    .actor
                    .as_ref()
                    .and_then(|a| pb::Channel::try_from(a.channel).ok())
                    .map(|c| label(c.as_str_name(), "CHANNEL_"))
                    .unwrap_or_default();
                println!("    #{:<4} {:<22} {:<28} {}", e.sequence, e.action, channel, e.to_state);
            }
            return Ok(());
        }
        Action::AuditVerify { card } => {
            let r = client
                .verify_audit_trail(pb::VerifyAuditTrailRequest { card_id: card.unwrap_or_default() })
                .await
                .map_err(status_error)?
                .into_inner();
            println!(
                "audit trail: {} cards, {} entries checked, {} from before the chain, {} breaks",
                r.cards_checked,
                r.entries_checked,
                r.unchained_entries,
                r.breaks.len()
            );
            for b in &r.breaks {
                println!("  card {} entry #{}: {}", b.card_id, b.sequence, b.reason);
            }
            anyhow::ensure!(r.breaks.is_empty(), "the audit trail's hash chain is broken");
            return Ok(());
        }
        Action::Person { id } => {
            let r =
                client.get_person(pb::GetPersonRequest { citizen_id: id }).await.map_err(status_error)?.into_inner();
            let p = r.person.unwrap_or_default();
            println!("person {} {} born {} region {}", p.citizen_id_masked, p.name, p.birth_date, p.region_code);
            for card in &r.cards {
                print_card(card);
            }
            return Ok(());
        }
    };
    print_card(&card.unwrap_or_default());
    Ok(())
}
