// A small grpc-java client of the public API, built by clients/check against
// the classes protoc (--java_out, --grpc-java_out) generated from
// proto/betting/v1: it reads a player's wallet with a gzip-compressed
// request and prints the balance.
//
//   java Client HOST PORT TOKEN

import io.betting.v1.GetWalletRequest;
import io.betting.v1.GetWalletResponse;
import io.betting.v1.WalletServiceGrpc;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.stub.MetadataUtils;
import java.util.concurrent.TimeUnit;

public final class Client {
  public static void main(String[] args) throws Exception {
    ManagedChannel channel =
        ManagedChannelBuilder.forAddress(args[0], Integer.parseInt(args[1])).usePlaintext().build();
    try {
      Metadata headers = new Metadata();
      headers.put(
          Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer " + args[2]);
      WalletServiceGrpc.WalletServiceBlockingStub wallet =
          WalletServiceGrpc.newBlockingStub(channel)
              .withInterceptors(MetadataUtils.newAttachHeadersInterceptor(headers))
              .withCompression("gzip")
              .withDeadlineAfter(10, TimeUnit.SECONDS);
      GetWalletResponse response = wallet.getWallet(GetWalletRequest.getDefaultInstance());
      System.out.println(response.getWallet().getBalance());
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }
}
