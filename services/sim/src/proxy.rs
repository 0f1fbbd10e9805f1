//! A fault-injecting WalletService and StakeService in front of the real ones.
//!
//! The betting instances and the settlers reach the wallet through this proxy,
//! exactly as a split deployment reaches it over the network. The schedule
//! arms faults for the next call of one RPC for one user; everything else is
//! forwarded untouched, the caller's bearer token included.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use betting_api::{
    pb::{
        self,
        wallet_service_client::WalletServiceClient,
        wallet_service_server::{WalletService, WalletServiceServer},
    },
    pb_internal::{
        self as pbi,
        stake_service_client::StakeServiceClient,
        stake_service_server::{StakeService, StakeServiceServer},
    },
};
use tonic::{Request, Response, Status, transport::Channel};

/// The RPCs whose calls can be faulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    Deposit,
    Withdraw,
    HoldStake,
    RefundStake,
    PayWinnings,
}

/// What happens to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Refused before it reaches the wallet: nothing happened.
    FailBefore,
    /// Carried out, then the reply is lost: it happened, the caller cannot tell.
    LoseReply,
    /// Refused as a misconfigured or rotated credential would be: nothing
    /// happened on this call, though an earlier one may have.
    Refuse,
    /// Carried out after a pause, so that retries and recovery passes race it.
    Delay(Duration),
}

/// Faults armed per (RPC, user), consumed in order by the calls that match.
#[derive(Debug, Default)]
pub struct FaultTable {
    armed: Mutex<HashMap<(Rpc, i64), VecDeque<Fault>>>,
}

impl FaultTable {
    pub fn arm(&self, rpc: Rpc, user: i64, fault: Fault) {
        if let Ok(mut armed) = self.armed.lock() {
            armed.entry((rpc, user)).or_default().push_back(fault);
        }
    }

    /// Heals the link: no armed fault survives.
    pub fn clear(&self) {
        if let Ok(mut armed) = self.armed.lock() {
            armed.clear();
        }
    }

    fn armed(&self, rpc: Rpc, user: i64) -> bool {
        self.armed
            .lock()
            .is_ok_and(|armed| armed.contains_key(&(rpc, user)))
    }

    fn take(&self, rpc: Rpc, user: i64) -> Option<Fault> {
        let mut armed = self.armed.lock().ok()?;
        let queue = armed.get_mut(&(rpc, user))?;
        let fault = queue.pop_front();
        if queue.is_empty() {
            armed.remove(&(rpc, user));
        }
        fault
    }
}

#[derive(Clone)]
pub struct FaultProxy {
    upstream: WalletServiceClient<Channel>,
    stakes: StakeServiceClient<Channel>,
    faults: Arc<FaultTable>,
}

impl FaultProxy {
    pub fn new(upstream: Channel, faults: Arc<FaultTable>) -> Self {
        Self {
            stakes: StakeServiceClient::new(upstream.clone()),
            upstream: WalletServiceClient::new(upstream),
            faults,
        }
    }

    /// The two services the wallet role serves, both through the faults.
    pub fn into_servers(self) -> (WalletServiceServer<Self>, StakeServiceServer<Self>) {
        (
            WalletServiceServer::new(self.clone()),
            StakeServiceServer::new(self),
        )
    }

    /// The first of a batch call's users with a fault armed for `rpc` (0:
    /// none): a batch carries that fault, and it strikes the whole call.
    fn first_armed(&self, rpc: Rpc, mut users: impl Iterator<Item = i64>) -> i64 {
        users.find(|&u| self.faults.armed(rpc, u)).unwrap_or(0)
    }

    /// Forwards one call through whatever fault is armed for it.
    async fn call<C, Req, Res, F, Fut>(
        &self,
        rpc: Rpc,
        user: i64,
        upstream: C,
        request: Request<Req>,
        forward: F,
    ) -> Result<Response<Res>, Status>
    where
        F: FnOnce(C, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Res>, Status>>,
    {
        let fault = self.faults.take(rpc, user);
        let upstream_request = forwarded(request);
        match fault {
            None => forward(upstream, upstream_request).await,
            Some(Fault::FailBefore) => Err(Status::unavailable("injected: connection refused")),
            Some(Fault::Refuse) => Err(Status::unauthenticated("injected: credential refused")),
            Some(Fault::LoseReply) => {
                let _ = forward(upstream, upstream_request).await;
                Err(Status::unavailable("injected: reply lost after the call"))
            }
            Some(Fault::Delay(pause)) => {
                tokio::time::sleep(pause).await;
                forward(upstream, upstream_request).await
            }
        }
    }
}

/// The request to send on: the same message and the caller's bearer token.
fn forwarded<T>(request: Request<T>) -> Request<T> {
    let authorization = request.metadata().get("authorization").cloned();
    let mut upstream = Request::new(request.into_inner());
    if let Some(value) = authorization {
        upstream.metadata_mut().insert("authorization", value);
    }
    upstream
}

#[tonic::async_trait]
impl WalletService for FaultProxy {
    async fn get_wallet(
        &self,
        request: Request<pb::GetWalletRequest>,
    ) -> Result<Response<pb::GetWalletResponse>, Status> {
        self.upstream.clone().get_wallet(forwarded(request)).await
    }

    async fn deposit(
        &self,
        request: Request<pb::DepositRequest>,
    ) -> Result<Response<pb::DepositResponse>, Status> {
        let user = request.get_ref().user_id;
        self.call(
            Rpc::Deposit,
            user,
            self.upstream.clone(),
            request,
            |mut c, r| async move { c.deposit(r).await },
        )
        .await
    }

    async fn withdraw(
        &self,
        request: Request<pb::WithdrawRequest>,
    ) -> Result<Response<pb::WithdrawResponse>, Status> {
        let user = request.get_ref().user_id;
        self.call(
            Rpc::Withdraw,
            user,
            self.upstream.clone(),
            request,
            |mut c, r| async move { c.withdraw(r).await },
        )
        .await
    }

    async fn list_ledger_entries(
        &self,
        _request: Request<pb::ListLedgerEntriesRequest>,
    ) -> Result<Response<pb::ListLedgerEntriesResponse>, Status> {
        Err(Status::unimplemented(
            "the simulation does not list entries",
        ))
    }
}

#[tonic::async_trait]
impl StakeService for FaultProxy {
    async fn hold_stake(
        &self,
        request: Request<pbi::HoldStakeRequest>,
    ) -> Result<Response<pbi::HoldStakeResponse>, Status> {
        let user = request.get_ref().user_id;
        self.call(
            Rpc::HoldStake,
            user,
            self.stakes.clone(),
            request,
            |mut c, r| async move { c.hold_stake(r).await },
        )
        .await
    }

    /// A batch carries the first fault armed for any of its holds' users,
    /// and it strikes the whole call (a link fails or loses a reply for
    /// every hold it carries); the other users' faults stay armed.
    async fn hold_stakes(
        &self,
        request: Request<pbi::HoldStakesRequest>,
    ) -> Result<Response<pbi::HoldStakesResponse>, Status> {
        let users = request.get_ref().holds.iter().map(|h| h.user_id);
        let user = self.first_armed(Rpc::HoldStake, users);
        self.call(
            Rpc::HoldStake,
            user,
            self.stakes.clone(),
            request,
            |mut c, r| async move { c.hold_stakes(r).await },
        )
        .await
    }

    /// Like HoldStakes: the first fault armed for any placement's user
    /// strikes the whole call.
    async fn place_stakes(
        &self,
        request: Request<pbi::PlaceStakesRequest>,
    ) -> Result<Response<pbi::PlaceStakesResponse>, Status> {
        let users = (request.get_ref().placements.iter())
            .filter_map(|p| p.hold.as_ref().map(|h| h.user_id));
        let user = self.first_armed(Rpc::HoldStake, users);
        self.call(
            Rpc::HoldStake,
            user,
            self.stakes.clone(),
            request,
            |mut c, r| async move { c.place_stakes(r).await },
        )
        .await
    }

    /// Like HoldStakes: the first fault armed for any payout's winner
    /// strikes the whole call.
    async fn pay_winnings_batch(
        &self,
        request: Request<pbi::PayWinningsBatchRequest>,
    ) -> Result<Response<pbi::PayWinningsBatchResponse>, Status> {
        let users = request.get_ref().payouts.iter().map(|p| p.user_id);
        let user = self.first_armed(Rpc::PayWinnings, users);
        self.call(
            Rpc::PayWinnings,
            user,
            self.stakes.clone(),
            request,
            |mut c, r| async move { c.pay_winnings_batch(r).await },
        )
        .await
    }

    async fn refund_stake(
        &self,
        request: Request<pbi::RefundStakeRequest>,
    ) -> Result<Response<pbi::RefundStakeResponse>, Status> {
        let user = request.get_ref().user_id;
        self.call(
            Rpc::RefundStake,
            user,
            self.stakes.clone(),
            request,
            |mut c, r| async move { c.refund_stake(r).await },
        )
        .await
    }

    async fn pay_winnings(
        &self,
        request: Request<pbi::PayWinningsRequest>,
    ) -> Result<Response<pbi::PayWinningsResponse>, Status> {
        let user = request.get_ref().user_id;
        self.call(
            Rpc::PayWinnings,
            user,
            self.stakes.clone(),
            request,
            |mut c, r| async move { c.pay_winnings(r).await },
        )
        .await
    }
}
