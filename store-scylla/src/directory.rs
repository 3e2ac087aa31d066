//! Workspaces and credentials: [`WorkspaceDirectory`] for [`ScyllaStore`].

use super::*;

#[async_trait]
impl WorkspaceDirectory for ScyllaStore {
    async fn create_workspace(
        &self,
        name: &str,
        write_key: Option<&str>,
        token: Option<&str>,
    ) -> Result<CreatedWorkspace> {
        let created = CreatedWorkspace::new(name, write_key, token)?;
        let (id, source_id) = (&created.workspace.id, &created.source_id);
        // The name and credentials are checked, then written. Not a lightweight transaction:
        // ScyllaDB keyspaces with tablets do not support them, and generated
        // credentials are random; only a supplied one can collide, and the
        // commands that supply one run alone.
        let credentials = [
            format!("w:{}", created.write_key),
            token_key(Scope::Admin, &created.token),
        ];
        if self.workspaces().await?.iter().any(|w| w.name == name) {
            return Err(StoreError::Conflict(format!("a workspace named {name:?}")));
        }
        for (credential, what) in credentials.iter().zip(["write key", "token"]) {
            let taken: Vec<(String, String)> =
                self.rows(&self.st.select_credential, (credential,)).await?;
            if !taken.is_empty() {
                return Err(StoreError::Conflict(what.into()));
            }
        }
        let created_at = created.workspace.created_at;
        self.write(&self.st.insert_workspace, (id, name, created_at))
            .await?;
        for credential in &credentials {
            self.write(&self.st.insert_credential, (credential, id, source_id))
                .await?;
        }
        Ok(created)
    }

    async fn workspaces(&self) -> Result<Vec<Workspace>> {
        let pager = self
            .session
            .execute_iter(self.st.select_workspaces.clone(), ())
            .await
            .map_err(classify)?;
        let rows: Vec<(String, Option<String>, Option<i64>)> = pager
            .rows_stream::<(String, Option<String>, Option<i64>)>()
            .map_err(corrupt)?
            .try_collect()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut out: Vec<Workspace> = rows
            .into_iter()
            .map(|(id, name, created_at)| Workspace {
                id,
                name: name.unwrap_or_default(),
                created_at: created_at.unwrap_or(0),
            })
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    async fn resolve_write_key(&self, write_key: &str) -> Result<Option<WriteGrant>> {
        let rows: Vec<(String, String)> = self
            .rows(&self.st.select_credential, (format!("w:{write_key}"),))
            .await?;
        Ok(rows
            .into_iter()
            .next()
            .map(|(workspace_id, source_id)| WriteGrant {
                workspace_id,
                source_id,
            }))
    }

    async fn resolve_token(&self, token: &str) -> Result<Option<ReadGrant>> {
        for scope in [Scope::Admin, Scope::Read] {
            let rows: Vec<(String, Option<String>)> = self
                .rows(&self.st.select_credential, (token_key(scope, token),))
                .await?;
            if let Some((workspace_id, _)) = rows.into_iter().next() {
                return Ok(Some(ReadGrant {
                    workspace_id,
                    scope,
                }));
            }
        }
        Ok(None)
    }

    async fn create_read_token(&self, workspace_id: &str) -> Result<String> {
        let token = new_secret("tmr_");
        self.write(
            &self.st.insert_credential,
            (token_key(Scope::Read, &token), workspace_id, ""),
        )
        .await?;
        Ok(token)
    }

    async fn identity_rules(&self, workspace_id: &str) -> Result<Option<RuleSettings>> {
        self.stored_rules(workspace_id).await
    }

    async fn set_identity_rules(&self, workspace_id: &str, rules: &RuleSettings) -> Result<()> {
        let checked =
            Rules::from_settings(rules).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let value = serde_json::to_string(rules).expect("settings serialise");
        self.write(
            &self.st.insert_setting,
            (workspace_id, "identity_rules", value),
        )
        .await?;
        self.rules.lock().expect("rules lock").insert(
            workspace_id.to_owned(),
            (std::time::Instant::now(), Arc::new(checked)),
        );
        Ok(())
    }

    async fn settings(&self, workspace_id: &str, prefix: &str) -> Result<Vec<(String, String)>> {
        let rows: Vec<(String, String)> = self
            .rows(&self.st.select_settings_from, (workspace_id, prefix))
            .await?;
        Ok(rows
            .into_iter()
            .take_while(|(name, _)| name.starts_with(prefix))
            .collect())
    }

    async fn put_setting(&self, workspace_id: &str, name: &str, value: Option<&str>) -> Result<()> {
        match value {
            Some(v) => {
                self.write(&self.st.insert_setting, (workspace_id, name, v))
                    .await
            }
            None => {
                self.write(&self.st.delete_setting, (workspace_id, name))
                    .await
            }
        }
    }
}
